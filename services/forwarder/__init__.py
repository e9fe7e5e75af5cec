"""Forwarder: holds the upstream API keys, calls Claude for allowed calls (at most once per call),
checks every answer against the policy bundle (tool command guardrails, response masking; see
:mod:`services.forwarder.guard`), and publishes the outcome for the record and the answer for the
waiting caller."""
