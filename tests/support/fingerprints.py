"""Fingerprint manifests for the end-to-end tests: one model, one destination PACS."""

from __future__ import annotations


def manifest(name, url, model, pacs, protocol="v2", modality="CT", ca_path=None, **server):
    """A Fingerprint matching `modality` that sends to `model` at `url` and delivers to `pacs`."""
    inference_server = {"url": url, "protocol": protocol, "model": model, **server}
    if ca_path:
        inference_server["caBundle"] = {"path": str(ca_path)}
    return {
        "apiVersion": "isdr.io/v1alpha1",
        "kind": "Fingerprint",
        "metadata": {"name": name},
        "spec": {
            "match": {"modality": modality},
            "inferenceServer": inference_server,
            "destinations": [{"host": "127.0.0.1", "port": pacs.port, "aeTitle": pacs.ae_title}],
        },
    }
