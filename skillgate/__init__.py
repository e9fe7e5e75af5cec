"""skillgate shared library: event contract and codec, Kafka setup, settings, identity, errors.

Every service imports from here; services never import each other's runtime modules.
"""

__version__ = "0.1.0"
