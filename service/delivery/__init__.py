"""From pending grants to Salla calls: batching (pure), the flush job, 422 bisection
(`refused`), unknown outcomes (`reconcile`), scheduled token refresh (`refresh`)."""
