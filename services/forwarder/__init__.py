"""Forwarder: holds the upstream API keys, calls Claude for allowed calls (at most once per call),
and publishes the outcome for the record and the answer for the waiting caller."""
