"""Policy: a faust-streaming app that decides on every submitted call and publishes the decision."""
