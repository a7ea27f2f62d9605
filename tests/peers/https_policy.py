"""An HTTPS server that is not Switchyard's, for MTA-STS policies: Python's http.server over
ssl. GET /.well-known/mta-sts.txt for Host H answers DIR/H.txt as text/plain (404 if there is no
such file); every request is appended to DIR/requests.log as "HOST PATH". Prints "ready PORT".

    python3 https_policy.py DIR CERT KEY
"""

import http.server
import os
import ssl
import sys

directory, cert, key = sys.argv[1:4]


class Policies(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host = (self.headers.get("Host") or "").split(":")[0]
        with open(os.path.join(directory, "requests.log"), "a") as log:
            log.write(f"{host} {self.path}\n")
        path = os.path.join(directory, host + ".txt")
        if self.path != "/.well-known/mta-sts.txt" or not os.path.isfile(path):
            self.send_error(404)
            return
        body = open(path, "rb").read()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Policies)
context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(f"ready {server.server_address[1]}", flush=True)
server.serve_forever()
