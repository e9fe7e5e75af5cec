"""A stand-in for api.anthropic.com: the Messages API, JSON and SSE, for tests, demos, benchmarks.

``create_app`` (in :mod:`services.stub_upstream.app`) builds the ASGI app, ``run`` (in
:mod:`services.stub_upstream.main`) serves it with uvicorn. Replies echo the last user message;
request headers (``x-stub-*``) inject latency, failures, tool calls and mid-stream errors, and every
request is kept in memory so tests can see what actually reached "Anthropic".
"""
