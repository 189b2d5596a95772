"""A Python client of the gateway with the standard library only: over TCP (base URL and key
from the environment, as `eval "$(qwen-token gateway env)"` sets them) or over the Unix socket.
Prints one JSON line: the chat reply and the streamed text."""
import http.client
import json
import os
import socket
import sys
import urllib.parse


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def connection():
    if len(sys.argv) > 1:
        return UnixHTTPConnection(sys.argv[1]), "/v1", {}
    base = urllib.parse.urlparse(os.environ["OPENAI_BASE_URL"])
    headers = {"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]}
    return http.client.HTTPConnection(base.hostname, base.port), base.path, headers


def chat(stream):
    conn, prefix, headers = connection()
    body = {"model": "qwen/coder-model", "messages": [{"role": "user", "content": "from python"}], "stream": stream}
    conn.request("POST", prefix + "/chat/completions", json.dumps(body), {**headers, "Content-Type": "application/json"})
    res = conn.getresponse()
    if res.status != 200:
        raise SystemExit("status %d: %s" % (res.status, res.read().decode()))
    if not stream:
        return json.loads(res.read())["choices"][0]["message"]["content"]
    text = ""
    for line in res:
        line = line.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            text += delta.get("content") or ""
    return text


print(json.dumps({"reply": chat(False), "streamed": chat(True)}))
