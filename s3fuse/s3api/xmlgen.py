"""Small XML documents of the S3 API: building responses, reading request bodies (bounded)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

from .errors import S3Error

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'


def el(name: str, *children, **kw) -> str:
    """`<name>children</name>`; a child is a string (already XML) or (name, text) pair."""
    inner = []
    for c in children:
        if c is None:
            continue
        if isinstance(c, tuple):
            inner.append(f"<{c[0]}>{escape(str(c[1]))}</{c[0]}>")
        else:
            inner.append(c)
    attrs = "".join(f' {k}="{v}"' for k, v in kw.items())
    return f"<{name}{attrs}>{''.join(inner)}</{name}>"


def document(root: str, *children) -> bytes:
    return (HEAD + el(root, *children, xmlns=NS)).encode()


def error_document(code: str, message: str, resource: str, request_id: str, extra: dict) -> bytes:
    parts = [("Code", code), ("Message", message)]
    parts += list(extra.items())
    parts += [("Resource", resource), ("RequestId", request_id)]
    return (HEAD + el("Error", *parts)).encode()


def parse(body: bytes) -> ET.Element:
    """A request body's XML, namespaces stripped from tags. No DTDs or entities."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise S3Error("MalformedXML", "the XML you provided was not well-formed")
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise S3Error("MalformedXML", "the XML you provided was not well-formed") from None
    for node in root.iter():
        if isinstance(node.tag, str) and node.tag.startswith("{"):
            node.tag = node.tag.split("}", 1)[1]
    return root
