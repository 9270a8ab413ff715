"""Pushes and pulls an artifact with the `oras` Python client (PyPI).

Usage: oras_roundtrip.py HOST WORKDIR [--chunked] [--referrers]

Pushes two files as an artifact (in chunks with --chunked), pulls it back
and compares; with --referrers also pushes a second artifact whose subject
is the first and reads the first's referrers. Prints "ok" on success.
"""
import os
import random
import sys

import oras.client
import oras.oci
import requests

host, workdir = sys.argv[1], sys.argv[2]
chunked = "--chunked" in sys.argv
referrers = "--referrers" in sys.argv
os.chdir(workdir)  # oras pushes files relative to the working directory

rng = random.Random(7)
files = {"big.bin": rng.randbytes(3 * 1024 * 1024 + 17), "notes.txt": b"hello, registry\n"}
for name, data in files.items():
    with open(name, "wb") as f:
        f.write(data)

client = oras.client.OrasClient(hostname=host, insecure=True)
target = f"{host}/artifacts/demo:v1"
response = client.push(
    target=target,
    files=list(files),
    do_chunked=chunked,
    chunk_size=1024 * 1024,
    quiet=True,
)
digest = response.headers["Docker-Content-Digest"]
pulled = client.pull(target=target, outdir="out")
assert sorted(os.path.basename(p) for p in pulled) == sorted(files), pulled
for name, data in files.items():
    with open(os.path.join("out", name), "rb") as f:
        assert f.read() == data, f"{name} differs after the round trip"

if referrers:
    manifest = requests.get(
        f"http://{host}/v2/artifacts/demo/manifests/{digest}",
        headers={"Accept": oras.defaults.default_manifest_media_type},
    )
    subject = oras.oci.Subject(
        mediaType=manifest.headers["Content-Type"], digest=digest, size=len(manifest.content)
    )
    with open("sig.txt", "wb") as f:
        f.write(b"signed by the test\n")
    client.push(
        target=f"{host}/artifacts/demo:sig",
        files=["sig.txt"],
        subject=subject,
        manifest_annotations={"purpose": "signature"},
        quiet=True,
    )
    index = requests.get(f"http://{host}/v2/artifacts/demo/referrers/{digest}").json()
    found = index["manifests"]
    assert len(found) == 1 and found[0]["annotations"]["purpose"] == "signature", index

print("ok")
