#!/usr/bin/env python3
"""A stand-in channel gateway for trying nudge locally (standard library only).

Accepts the JSON POST nudge sends for each step on any path (/push, /email,
/call-task in deploy/nudge.local.toml), and each withdrawal (`WITHDRAW` and the
step's key), prints one line per message, and answers
with --status (default 200; try 503 to watch retries, 400 for a final failure).
Not for production: it delivers nothing.

    python3 deploy/channel-stub.py [--port 8080] [--status 200]
"""

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--status", type=int, default=200)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            key = self.headers.get("Idempotency-Key")
            auth = "yes" if self.headers.get("Authorization") else "no"
            try:
                m = json.loads(body)
            except ValueError:
                m = None
            if not isinstance(m, dict):
                line = f"{self.path} (not a JSON object: {body[:80]!r})"
            elif m.get("action") == "withdraw":
                line = (
                    f"{self.path} WITHDRAW {m.get('idempotency_key')} "
                    f"reason={m.get('reason')} key={key} auth={auth}"
                )
            else:
                line = (
                    f"{self.path} {m.get('customer')} {m.get('journey')}/{m.get('step')} "
                    f"template={m.get('template')} attempt={m.get('attempt')} "
                    f"history={len(m.get('history', []))} key={key} auth={auth}"
                )
            print(f"{args.status} {line}", flush=True)
            self.send_response(args.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass  # one line per message above is enough

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"channel stub on http://{args.host}:{args.port}/ answering {args.status}", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
