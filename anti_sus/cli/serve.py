"""``anti-sus serve`` (the filter server, or a broker worker) and ``anti-sus broker`` (the load balancer)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from photocore.errors import UserError
from photocore.settings import bind_endpoint, byte_size, endpoint, port_or_off, positive_float, positive_int

from . import options
from .options import (DEFAULT_BACKEND, DEFAULT_SERVER, add_curve_server, add_limits, add_logging, add_models, add_thresholds,
                      default_queued_bytes, instance_token, settings)


def add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the filter server (or a broker worker with --connect)")
    s = settings(p)
    s.add("--bind", type=bind_endpoint, default=[DEFAULT_SERVER], many=True, help="endpoint to bind (repeat for several)")
    s.add("--connect", type=endpoint, help="work for a broker: connect to its backend endpoint instead of binding")
    s.add("--credits", default=1, type=positive_int, help="requests a broker worker takes at once")
    s.add("--heartbeat", default=2.0, type=positive_float, help="seconds between a broker worker's READY heartbeats")
    add_models(p)
    add_thresholds(p, True)
    s.add("--max-batch", default=32, type=positive_int, help="most images per model call (requests are batched together up to this)")
    s.add("--max-queue", default=256, type=positive_int, help="most images queued; a request beyond it is answered busy (clients retry)")
    s.add("--max-queued-bytes", default=default_queued_bytes(), type=byte_size, shown="1/8 of this machine's memory, within 256 MiB..4 GiB",
          help="most payload bytes held (queued + the batch in hand), e.g. 512M or 2G; a request beyond it is answered busy")
    s.add("--instance", type=instance_token, shown="a random one per start",
          help="token that info/ping report, so a launcher can tell its own server")
    add_limits(p)
    add_curve_server(p)
    s.add("--metrics-port", default=0, type=port_or_off, help="serve Prometheus metrics on this port (0: off)")
    s.add("--metrics-host", default="127.0.0.1", help="address for the metrics endpoint")
    add_logging(p)


def add_broker(sub: Any) -> None:
    p = sub.add_parser("broker", help="load-balancing broker in front of several `serve --connect` workers")
    s = settings(p)
    s.add("--frontend", type=bind_endpoint, default=[DEFAULT_SERVER], many=True, help="endpoint for clients (repeat for several)")
    s.add("--backend", type=bind_endpoint, default=[DEFAULT_BACKEND], many=True, help="endpoint for workers (repeat for several)")
    s.add("--worker-timeout", default=10.0, type=positive_float,
          help="drop a worker not heard from for this many seconds (workers beat every --heartbeat)")
    add_limits(p)
    add_curve_server(p)
    add_logging(p)


def cmd_serve(args: argparse.Namespace) -> int:
    import zmq

    from photocore.observe import start_metrics

    from ..server import FilterServer, ServerConfig
    from ..wire import Limits

    if args.curve_allow and not args.curve_secret_key:
        raise UserError("--curve-allow needs --curve-secret-key")
    if args.connect and args.curve_secret_key:
        raise UserError("a broker worker (--connect) takes no CURVE keys: secure the broker's frontend instead "
                        "(anti-sus broker --curve-secret-key …) and keep its backend on a private network")
    pipeline = options.load_pipeline(args, args.gmm_threshold, args.watermark_threshold, args.max_batch)
    cfg = ServerConfig(binds=list(args.bind), connect=args.connect, limits=Limits(args.max_images, args.max_pixels),
                       max_batch=args.max_batch, max_queue=max(args.max_queue, args.max_images),
                       max_queued_bytes=args.max_queued_bytes, hwm=args.hwm, credits=args.credits, heartbeat=args.heartbeat,
                       curve_secret_key=args.curve_secret_key, curve_allow=args.curve_allow, instance=args.instance)
    server = FilterServer(pipeline, cfg)
    try:
        server.bind()
    except zmq.ZMQError as exc:
        raise UserError(f"cannot {'connect to' if args.connect else 'bind'} {args.connect or ', '.join(args.bind)}: {exc}") from None
    if args.metrics_port:
        start_metrics(args.metrics_port, args.metrics_host)
    options.on_signals(server.stop)
    server.serve_forever()
    if server.failure is not None:
        # Exit non-zero so a supervisor (compose, systemd, the stack launcher) restarts a server that cannot compute.
        print(f"anti-sus: error: {server.failure}; exiting", file=sys.stderr)
        return 1
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from ..broker import Broker
    from ..wire import Limits

    if args.curve_allow and not args.curve_secret_key:
        raise UserError("--curve-allow needs --curve-secret-key")
    broker = Broker(list(args.frontend), list(args.backend), limits=Limits(args.max_images, args.max_pixels), hwm=args.hwm,
                    worker_timeout=args.worker_timeout, curve_secret_key=args.curve_secret_key, curve_allow=args.curve_allow)
    options.on_signals(broker.stop)
    broker.serve_forever()
    return 0
