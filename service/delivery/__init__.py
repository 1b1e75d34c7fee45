"""From pending grants to Salla calls: batching (pure) and the flush job."""
