"""The relay client's pure parts: where a base URL points, and the request head it sends."""

from __future__ import annotations

import pytest

from mvllm.common.upstream import (
    Upstream,
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    request_head,
)


def test_origin_of_plain_and_tls_urls():
    up = Upstream()
    o = up.origin("http://127.0.0.1:9001")
    assert (o.key, o.host, o.port, o.ssl, o.host_header, o.prefix) == (
        ("http", "127.0.0.1", 9001), "127.0.0.1", 9001, None, "127.0.0.1:9001", ""
    )
    t = up.origin("https://node.example/base/")
    assert t.port == 443 and t.ssl is not None and t.host_header == "node.example" and t.prefix == "/base"
    assert up.origin("http://[::1]:8000").host_header == "[::1]:8000"
    assert up.origin("http://h").port == 80
    assert up.origin("http://127.0.0.1:9001") is o  # parsed once per base URL


def test_head_is_one_block_with_host_and_length():
    o = Upstream().origin("http://127.0.0.1:9001/p")
    head = request_head("POST", o, "/v1/chat/completions?x=1", [("Content-Type", "application/json")], b"{}")
    assert head == (
        b"POST /p/v1/chat/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9001\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    )


def test_length_only_where_a_body_is_or_is_expected():
    o = Upstream().origin("http://127.0.0.1:1")
    assert b"Content-Length" not in request_head("GET", o, "/v1/models", [], b"")
    assert b"Content-Length: 0\r\n" in request_head("POST", o, "/v1/x", [], b"")


def test_repeated_headers_kept_and_utf8_values_encoded():
    o = Upstream().origin("http://127.0.0.1:1")
    head = request_head("GET", o, "/", [("X-A", "1"), ("X-A", "2"), ("X-Name", "é")], b"")
    assert b"X-A: 1\r\nX-A: 2\r\n" in head and "X-Name: é\r\n".encode() in head


@pytest.mark.parametrize("name,value", [("X-A", "1\r\nX-Evil: 1"), ("X-A\nX-B", "1"), ("X-A", "a\nb")])
def test_a_line_break_in_a_header_is_refused(name, value):
    o = Upstream().origin("http://127.0.0.1:1")
    with pytest.raises(UpstreamProtocolError):
        request_head("GET", o, "/", [(name, value)], b"")


def test_errors_are_os_errors_and_timeouts_are_timeouts():
    assert issubclass(UpstreamError, OSError)
    assert issubclass(UpstreamTimeoutError, TimeoutError)
    # Neither is a ConnectionError: the relay tells a node's failure from its client's going away.
    assert not issubclass(UpstreamClosedError, ConnectionError)
    assert not issubclass(UpstreamConnectError, ConnectionError)
