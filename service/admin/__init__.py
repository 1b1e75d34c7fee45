"""What an operator asks of a running service, and what they change, through `/admin/` and the
`salla-rewards admin`, `grants` and `campaign` commands.

queries    read-only views of a store, an order, a customer (Redis in, dicts out)
times      the `--since` / `--until` range operators type
export     the ledger's grants as JSONL or CSV
replay     stored webhooks through the current rules
grants     list grants in a state, and queue them again
campaigns  points (or a reset) for many customers, through the ledger
http       the `/admin/` routes (Starlette)
commands   the `admin` command group; grant_commands: `grants` and `campaign`

Nothing here parses arguments or prints: the commands and routes do that.
"""
