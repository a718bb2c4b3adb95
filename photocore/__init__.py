"""photocore: the contract and plumbing that nomad, anti_sus and gallery_bridge share.

Each module has one job; the services import from here and not from each other:
the wire protocol's framing and error codes, the Lazy Pirate request/reply client
and the server envelope, CURVE setup, logging and metrics, format sniffing,
atomic writes, backoff, log redaction and the configuration layer (flags + env +
secret files) with its validators.
"""
