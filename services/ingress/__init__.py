"""Ingress: the drop-in Anthropic API endpoint. Authenticates callers, publishes calls to Kafka,
and hands each synchronously waiting caller its answer from the replies topic."""
