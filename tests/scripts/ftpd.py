#!/usr/bin/python3
"""Anonymous read-only FTP server for proxyd's integration tests (pyftpdlib).

Usage: ftpd.py ADDRESS PORT ROOT_DIR [LINGER_SECONDS]

Serves ROOT_DIR read-only to user "anonymous" on ADDRESS:PORT and prints
"ready PORT" on stdout once listening; runs until killed.

LINGER_SECONDS (default 0): after the last byte of a download has been sent,
keep the data connection open this long before closing it. The test polls
`proxyd ip socks connections print` meanwhile, so the data connection's row is
seen with its final byte counters before it goes away.
"""
import logging
import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import DTPHandler, FTPHandler
from pyftpdlib.servers import FTPServer


class LingeringDTPHandler(DTPHandler):
    """A data channel that waits `linger` seconds before closing a finished download."""

    linger = 0.0
    _lingering = False

    def close(self):
        finished_download = (not self._closed and not self.receive
                             and self.transfer_finished)
        if self.linger > 0 and finished_download and not self._lingering:
            self._lingering = True
            self.del_channel()  # no more events: the peer's EOF must not spin the loop
            self.ioloop.call_later(self.linger, self._close_now)
            return
        DTPHandler.close(self)

    def _close_now(self):
        DTPHandler.close(self)


def main():
    address, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    linger = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(root)
    LingeringDTPHandler.linger = linger
    handler = FTPHandler
    handler.authorizer = authorizer
    handler.dtp_handler = LingeringDTPHandler
    # Through a SOCKS proxy the PORT address is the proxy's, not the client's.
    handler.permit_foreign_addresses = True
    handler.timeout = 60
    server = FTPServer((address, port), handler)
    print("ready", server.socket.getsockname()[1], flush=True)
    server.serve_forever(timeout=0.5)


if __name__ == "__main__":
    main()
