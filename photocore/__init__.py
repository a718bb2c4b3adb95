"""photocore: the contract and plumbing that nomad, anti_sus and gallery_bridge share.

Each module has one job; the services import from here and not from each other:
the wire protocol's framing and error codes, the Lazy Pirate request/reply client
and the server envelope, CURVE setup, logging and metrics, format sniffing,
atomic writes, backoff, log redaction and the configuration layer (flags + env +
secret files) with its validators.

    protocol    framing, error codes, reply frames (wire protocol v1)
    envelope    ROUTER message -> (routing envelope, body)
    client      ReqClient: the Lazy Pirate client under anti_sus.client and gallery_bridge.client
    curve       key files, CURVE server sockets with an allow-list, client keys
    backoff     Backoff (exponential, full jitter, capped), retry_after_seconds
    observe     text/JSON logging, Prometheus metrics endpoint
    redact      credential masking for messages and every log handler
    sniff       image format from magic bytes
    atomic      durable atomic writes (temp, fsync, rename, fsync dir)
    closing     Closeable: ``with`` for owners of sockets, threads and files
    wireimage   any decoded picture -> the wire's uint8[512, 512, 3]
    settings    flags + env + secret files, validators
    paths       default data folders (model artifacts)
    errors      UserError: one line and a non-zero exit
    blas        one OpenBLAS thread for the services that do no BLAS work worth more
"""
