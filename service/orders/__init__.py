"""Orders: what an order deserves, from its webhooks and from Salla's orders API.

`verdicts` turns an order event (or a state fetched from Salla) into the ledger's input;
`truth` asks Salla for an order when its events cannot decide (and confirms held points);
`reconcile` finds orders whose webhooks never came; `commands` are the `orders` CLI verbs.
"""
