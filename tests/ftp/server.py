"""A real FTP server (pyftpdlib) for tests/ftp.rs: serves ROOT on
127.0.0.1:PORT to anonymous and to alice:s3cret, appends every command it
receives to LOG (one line each), and, when CUT is not 0, sends only the
first CUT bytes of the first RETR (a transfer cut short), as a server that
drops the data connection would."""

import os
import sys
import tempfile

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer

root, port, log, cut = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
state = {"cut": cut}

authorizer = DummyAuthorizer()
authorizer.add_anonymous(root)
authorizer.add_user("alice", "s3cret", root, perm="elr")


class Handler(FTPHandler):
    def pre_process_command(self, line, cmd, arg):
        with open(log, "a") as f:
            f.write(line + "\n")
        return super().pre_process_command(line, cmd, arg)

    def ftp_RETR(self, file):
        if state["cut"] and self._restart_position == 0:
            n, state["cut"] = state["cut"], 0
            with open(file, "rb") as f:
                head = f.read(n)
            short = os.path.join(tempfile.mkdtemp(), "short")
            with open(short, "wb") as f:
                f.write(head)
            return super().ftp_RETR(short)
        return super().ftp_RETR(file)


Handler.authorizer = authorizer
server = FTPServer(("127.0.0.1", port), Handler)
print("ready", flush=True)
server.serve_forever()
