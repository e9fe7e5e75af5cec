"""The policy engine as a pure library: bundles, decisions. Used by the policy service (requests)
and the forwarder (responses); it does no I/O of its own."""
