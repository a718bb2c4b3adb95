"""``anti-sus serve`` (the filter server, or a broker worker) and ``anti-sus broker`` (the load balancer)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
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
    s.add("--curve-server-key", type=Path,
          help="with --connect: the broker backend's public .key file (makes this worker a CURVE client of the broker)")
    s.add("--curve-client-key", type=Path,
          help="with --connect: this worker's .key_secret file; its .key must be in the broker's --backend-curve-allow")
    s.add("--admin-allow", type=Path,
          help="with CURVE: a directory of public .key files (or one .key file) of the clients that may call the "
               "reload op (`anti-sus reload`); other clients get 'forbidden'. SIGHUP reloads too")
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
    s.add("--backend-curve-secret-key", type=Path,
          help="enable CURVE on the workers' side with this .key_secret file (needs --backend-curve-allow)")
    s.add("--backend-curve-allow", type=Path,
          help="directory of the allowed workers' public .key files (only these workers are given requests)")
    s.add("--admin-allow", type=Path,
          help="with CURVE on the frontend: a directory of public .key files (or one .key file) of the clients that may "
               "ask for a rolling reload of the workers (`anti-sus reload --server FRONTEND`); others get 'forbidden'")
    s.add("--reload-timeout", default=300.0, type=positive_float,
          help="seconds a worker may take to reload before a rolling reload gives up on it")
    add_logging(p)


def cmd_serve(args: argparse.Namespace) -> int:
    import zmq

    from photocore.observe import start_metrics

    from ..server import FilterServer, ServerConfig
    from ..wire import Limits

    if args.curve_allow and not args.curve_secret_key:
        raise UserError("--curve-allow needs --curve-secret-key")
    if args.connect and args.curve_secret_key:
        raise UserError("a broker worker (--connect) is a CURVE client, not a server: give it the broker backend's "
                        "public key (--curve-server-key) and its own --curve-client-key instead of --curve-secret-key")
    if (args.curve_server_key or args.curve_client_key) and not args.connect:
        raise UserError("--curve-server-key/--curve-client-key are for a broker worker (--connect); "
                        "a server that binds takes --curve-secret-key")
    if args.curve_server_key and not args.curve_client_key:
        raise UserError("--curve-server-key needs --curve-client-key (the broker admits only listed worker keys)")
    if args.curve_client_key and not args.curve_server_key:
        raise UserError("--curve-client-key needs --curve-server-key")
    if args.curve_server_key:
        from photocore.curve import load_keypair, server_public_key

        server_public_key(args.curve_server_key, "--curve-server-key")  # refuses a secret key in its place
        if load_keypair(args.curve_client_key)[1] is None:
            raise UserError(f"--curve-client-key {args.curve_client_key} holds no secret key; pass the worker's .key_secret file")
    admins = admin_keys(args.admin_allow) if args.admin_allow else None
    if admins and not args.curve_secret_key:
        raise UserError("--admin-allow needs --curve-secret-key (without CURVE the server cannot tell clients apart)")

    def loader() -> Any:
        """The models again from --models, with this start's flags (reload op and SIGHUP)."""
        return options.load_pipeline(args, args.gmm_threshold, args.watermark_threshold, args.max_batch)

    pipeline = loader()
    cfg = ServerConfig(binds=list(args.bind), connect=args.connect, limits=Limits(args.max_images, args.max_pixels),
                       max_batch=args.max_batch, max_queue=max(args.max_queue, args.max_images),
                       max_queued_bytes=args.max_queued_bytes, hwm=args.hwm, credits=args.credits, heartbeat=args.heartbeat,
                       curve_secret_key=args.curve_secret_key, curve_allow=args.curve_allow,
                       curve_server_key=args.curve_server_key, curve_client_key=args.curve_client_key, instance=args.instance,
                       loader=loader, admin_keys=admins)
    server = FilterServer(pipeline, cfg)
    try:
        server.bind()
    except zmq.ZMQError as exc:
        raise UserError(f"cannot {'connect to' if args.connect else 'bind'} {args.connect or ', '.join(args.bind)}: {exc}") from None
    if args.metrics_port:
        start_metrics(args.metrics_port, args.metrics_host)
    options.on_signals(server.stop)
    options.on_reload_signal(server.reload)
    server.serve_forever()
    if server.failure is not None:
        # Exit non-zero so a supervisor (compose, systemd, the stack launcher) restarts a server that cannot compute.
        print(f"anti-sus: error: {server.failure}; exiting", file=sys.stderr)
        return 1
    return 0


def admin_keys(path: Path) -> frozenset[str]:
    """Z85 public keys of ``--admin-allow``: a directory of ``.key`` files (checked like --curve-allow) or one key file."""
    from photocore.curve import check_allow_dir, load_keypair, server_public_key

    if path.is_file():
        return frozenset({server_public_key(path, "--admin-allow").decode("ascii")})
    d = check_allow_dir(path, "--admin-allow")
    return frozenset(load_keypair(k)[0].decode("ascii") for k in sorted(d.glob("*.key")))


def cmd_broker(args: argparse.Namespace) -> int:
    from ..broker import Broker
    from ..wire import Limits

    if args.curve_allow and not args.curve_secret_key:
        raise UserError("--curve-allow needs --curve-secret-key")
    admins = admin_keys(args.admin_allow) if args.admin_allow else None
    if admins and not args.curve_secret_key:
        raise UserError("--admin-allow needs --curve-secret-key (without CURVE the broker cannot tell clients apart)")
    broker = Broker(list(args.frontend), list(args.backend), limits=Limits(args.max_images, args.max_pixels), hwm=args.hwm,
                    admin_keys=admins, reload_timeout=args.reload_timeout,
                    worker_timeout=args.worker_timeout, curve_secret_key=args.curve_secret_key, curve_allow=args.curve_allow,
                    backend_curve_secret_key=args.backend_curve_secret_key, backend_curve_allow=args.backend_curve_allow)
    options.on_signals(broker.stop)
    broker.serve_forever()
    return 0
