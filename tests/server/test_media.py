"""Image decoding and the remote fetch policy. No network: data URLs, a loopback server, and
httpx `MockTransport` with an injected resolver for the public-looking hosts."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import ipaddress
import struct
import threading
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
from PIL import Image

from server.errors import APIError
from server.media import (
    check_image_count,
    decode_image,
    host_allowed,
    is_public_address,
    load_image,
    load_request_images,
)
from server.protocol import ChatCompletionRequest
from server.settings import ServeSettings

T = TypeVar("T")
PARAM = "messages[0].content[1].image_url.url"
PUBLIC_IP = "93.184.215.14"  # looks public; never contacted (mock transport)


@dataclass
class Policy:
    max_images_per_request: int = 4
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 1 << 20
    allow_remote_images: bool = False
    allowed_media_domains: list[str] = field(default_factory=list)
    remote_timeout_s: float = 5.0


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def red(size: tuple[int, int] = (8, 6), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, (255, 0, 0) if mode == "RGB" else (255, 0, 0, 255))


def refused(coro: Awaitable[Any], *words: str, param: str | None = PARAM) -> APIError:
    with pytest.raises(APIError) as exc:
        run(coro)
    err = exc.value
    assert err.status == 400 and err.param == param, err
    for w in words:
        assert w in err.message, err.message
    return err


# --- data: URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, media",
    [
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
    ],
)
def test_data_url_formats(fmt: str, media: str) -> None:
    img = run(load_image(data_url(encode(red(), fmt), media), Policy(), PARAM))
    assert img.mode == "RGB" and img.size == (8, 6)
    r, g, b = img.getpixel((3, 3))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60


def test_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = run(load_image(data_url(encode(img)), Policy(), PARAM))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_base64_with_line_breaks_and_no_padding() -> None:
    text = base64.b64encode(encode(red())).decode().rstrip("=")
    wrapped = "\n".join(text[i : i + 60] for i in range(0, len(text), 60))
    assert run(load_image(f"data:image/png;base64,{wrapped}", Policy(), PARAM)).size == (8, 6)


def test_invalid_base64() -> None:
    err = refused(load_image("data:image/png;base64,@@@not base64!!", Policy(), PARAM), "base64")
    assert err.code == "invalid_base64"


def test_not_an_image() -> None:
    url = data_url(b"hello, I am a text file, not a picture at all")
    assert refused(load_image(url, Policy(), PARAM), "not an image").code == "invalid_image"


def test_truncated_png() -> None:
    png = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    refused(load_image(data_url(png[: len(png) // 2]), Policy(), PARAM), "truncated")


@pytest.mark.parametrize(
    "url, words",
    [
        ("data:text/plain;base64,aGk=", ("media type",)),
        ("data:image/svg+xml;base64,PHN2Zy8+", ("media type",)),
        ("data:image/png,rawbytes", ("base64-encoded",)),
        ("data:image/png;base64", ("Malformed",)),
        ("data:image/png;base64,", ("no image bytes",)),
    ],
)
def test_bad_data_urls(url: str, words: tuple[str, ...]) -> None:
    refused(load_image(url, Policy(), PARAM), *words)


def test_pixel_cap_checked_before_decoding() -> None:
    url = data_url(encode(red((100, 100))))
    err = refused(load_image(url, Policy(max_image_pixels=64 * 64), PARAM), "100×100", "downscale")
    assert err.code == "image_too_large"


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [5000, 100_000])  # under and over Pillow's own bomb limit
def test_decompression_bomb_header(side: int) -> None:
    url = data_url(_png_header_only(side, side))
    refused(load_image(url, Policy(), PARAM), "limit", "--max-image-pixels")


def test_image_byte_cap() -> None:
    url = data_url(encode(Image.effect_noise((64, 64), 50).convert("RGB")))
    refused(load_image(url, Policy(max_image_bytes=1000), PARAM), "--max-image-bytes")


def test_decode_image_direct() -> None:
    assert decode_image(encode(red(), "JPEG"), 1000).size == (8, 6)


# --- schemes and the remote switch ---------------------------------------------------------------


def test_remote_disabled_says_how_to_enable() -> None:
    err = refused(
        load_image("https://example.com/cat.png", Policy(), PARAM),
        "disabled",
        "--allow-remote-images",
        "data:",
    )
    assert err.code == "remote_images_disabled"


@pytest.mark.parametrize("remote", [False, True])
@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/x.png", "/etc/passwd", "gopher://x/"]
)
def test_other_schemes_refused(url: str, remote: bool) -> None:
    err = refused(load_image(url, Policy(allow_remote_images=remote), PARAM), "not accepted")
    assert "/etc/passwd" not in err.message


# --- a real server on loopback -------------------------------------------------------------------


@pytest.fixture
def loopback_server() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []
    png = encode(red())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_loopback_server_is_refused(loopback_server: tuple[str, list[str]]) -> None:
    base, hits = loopback_server
    policy = Policy(allow_remote_images=True)
    err = refused(load_image(f"{base}/red.png", policy, PARAM), "non-public address")
    assert err.code == "image_url_refused"
    port = base.rsplit(":", 1)[1]
    refused(load_image(f"http://localhost:{port}/red.png", policy, PARAM), "non-public")
    refused(load_image(f"http://[::1]:{port}/red.png", policy, PARAM), "non-public")
    assert hits == []  # never connected


# --- mock transport with an injected resolver ---------------------------------------------------


DNS: dict[str, list[str]] = {
    "images.example.com": [PUBLIC_IP],
    "cdn.example.com": [PUBLIC_IP],
    "internal.example.com": ["10.0.0.5"],
    "metadata.example.com": ["169.254.169.254"],
    "split.example.com": [PUBLIC_IP, "192.168.1.10"],
    "v6local.example.com": ["fd00::1"],
}


def fake_resolve(calls: list[str] | None = None) -> Callable[[str, int], Awaitable[Sequence[str]]]:
    async def resolve(host: str, port: int) -> Sequence[str]:
        if calls is not None:
            calls.append(host)
        if host not in DNS:
            raise OSError("name not known")
        return DNS[host]

    return resolve


Route = Callable[[httpx.Request], httpx.Response]


def mock_client(route: Route, seen: list[httpx.Request]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return route(request)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def fetch(
    url: str, route: Route, policy: Policy | None = None, calls: list[str] | None = None
) -> tuple[Awaitable[Image.Image], list[httpx.Request]]:
    seen: list[httpx.Request] = []
    policy = policy or Policy(allow_remote_images=True)

    async def go() -> Image.Image:
        async with mock_client(route, seen) as client:
            return await load_image(url, policy, PARAM, client=client, resolve=fake_resolve(calls))

    return go(), seen


def png_response(_: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=encode(red()), headers={"Content-Type": "image/png"})


def test_public_host_is_fetched_pinned_to_the_checked_ip() -> None:
    coro, seen = fetch("https://images.example.com/a/red.png?x=1", png_response)
    img = run(coro)
    assert img.size == (8, 6)
    (req,) = seen
    assert req.url.host == PUBLIC_IP and req.url.path == "/a/red.png" and req.url.query == b"x=1"
    assert req.headers["host"] == "images.example.com"
    assert req.extensions.get("sni_hostname") == "images.example.com"


def test_works_with_serve_settings_and_allowlist_subdomain() -> None:
    settings = ServeSettings(allow_remote_images=True, allowed_media_domains=["example.com"])
    coro, seen = fetch("http://cdn.example.com/r.png", png_response, settings)  # type: ignore[arg-type]
    assert run(coro).size == (8, 6) and len(seen) == 1


def test_domain_not_on_allowlist() -> None:
    calls: list[str] = []
    policy = Policy(allow_remote_images=True, allowed_media_domains=["images.example.com"])
    coro, seen = fetch("https://cdn.example.com/r.png", png_response, policy, calls)
    err = refused(coro, "cdn.example.com", "--allowed-media-domains")
    assert err.code == "image_domain_not_allowed"
    assert seen == [] and calls == []  # refused before resolving


@pytest.mark.parametrize(
    "host",
    [
        "internal.example.com",
        "metadata.example.com",
        "split.example.com",
        "v6local.example.com",
        "10.1.2.3",
        "[fe80::1]",
        "0.0.0.0",
        "[::ffff:127.0.0.1]",
    ],
)
def test_name_resolving_to_private_address_refused(host: str) -> None:
    coro, seen = fetch(f"http://{host}/r.png", png_response)
    refused(coro, "non-public")
    assert seen == []


def test_unresolvable_host() -> None:
    coro, seen = fetch("http://nowhere.example.net/r.png", png_response)
    refused(coro, "could not be resolved")
    assert seen == []


def _redirect_to(location: str) -> Route:
    def route(request: httpx.Request) -> httpx.Response:
        if request.headers["host"] == "images.example.com":
            return httpx.Response(302, headers={"Location": location})
        return png_response(request)

    return route


@pytest.mark.parametrize(
    "location, words",
    [
        ("http://127.0.0.1/admin", ("redirected to", "non-public")),
        ("http://[::1]:8080/", ("redirected to", "non-public")),
        ("http://internal.example.com/x.png", ("redirected to", "non-public")),
        ("http://metadata.example.com/latest/meta-data/", ("non-public",)),
        ("file:///etc/passwd", ("redirected to", "'file:'")),
        ("http://user:pw@cdn.example.com/x.png", ("credentials",)),
    ],
)
def test_redirect_rechecked(location: str, words: tuple[str, ...]) -> None:
    policy = Policy(allow_remote_images=True, allowed_media_domains=["example.com"])
    coro, seen = fetch("https://images.example.com/r.png", _redirect_to(location), policy)
    refused(coro, *words)
    assert len(seen) == 1  # the redirect target was never contacted


def test_redirect_outside_allowlist_refused() -> None:
    policy = Policy(allow_remote_images=True, allowed_media_domains=["images.example.com"])
    coro, seen = fetch(
        "https://images.example.com/r.png", _redirect_to("https://cdn.example.com/x.png"), policy
    )
    refused(coro, "redirected to host 'cdn.example.com'")
    assert len(seen) == 1


def test_relative_redirect_to_allowed_host_followed() -> None:
    def route(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/old.png":
            return httpx.Response(301, headers={"Location": "/new.png"})
        return png_response(request)

    coro, seen = fetch("http://images.example.com/old.png", route)
    assert run(coro).size == (8, 6)
    assert [r.url.path for r in seen] == ["/old.png", "/new.png"]
    assert all(r.headers["host"] == "images.example.com" for r in seen)


def test_too_many_redirects() -> None:
    def route(request: httpx.Request) -> httpx.Response:
        n = int(request.url.path.strip("/") or 0)
        return httpx.Response(302, headers={"Location": f"/{n + 1}"})

    coro, seen = fetch("http://images.example.com/0", route)
    refused(coro, "more than 3")
    assert len(seen) == 4


def test_http_error_status() -> None:
    coro, _ = fetch("http://images.example.com/missing.png", lambda r: httpx.Response(404))
    assert refused(coro, "HTTP 404").code == "image_fetch_failed"


def test_byte_cap_declared_length() -> None:
    big = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    coro, _ = fetch(
        "http://images.example.com/big.png",
        lambda r: httpx.Response(200, content=big),
        Policy(allow_remote_images=True, max_image_bytes=1000),
    )
    refused(coro, "--max-image-bytes")


def test_byte_cap_while_streaming_without_length() -> None:
    pulled: list[int] = []

    async def endless() -> Any:
        for i in range(1000):
            pulled.append(i)
            yield b"\0" * 1024

    coro, _ = fetch(
        "http://images.example.com/big.png",
        lambda r: httpx.Response(200, content=endless()),
        Policy(allow_remote_images=True, max_image_bytes=4096),
    )
    refused(coro, "--max-image-bytes")
    assert len(pulled) < 10  # stopped reading at the cap


def test_timeout_covers_the_fetch() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return png_response(request)

    seen: list[httpx.Request] = []

    async def go() -> Image.Image:
        async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as client:
            return await load_image(
                "http://images.example.com/slow.png",
                Policy(allow_remote_images=True, remote_timeout_s=0.2),
                PARAM,
                client=client,
                resolve=fake_resolve(),
            )

    err = refused(go(), "did not answer within 0.2 s")
    assert err.code == "image_fetch_timeout" and not seen


# --- address classification and allowlist --------------------------------------------------------


@pytest.mark.parametrize(
    "ip, public",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("192.0.2.1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::a00:1", False),
        ("2002:7f00:1::", False),
    ],
)
def test_is_public_address(ip: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(ip)) is public


def test_host_allowed() -> None:
    allowed = ["example.com"]
    assert host_allowed("example.com", allowed) and host_allowed("a.b.example.com", allowed)
    assert not host_allowed("badexample.com", allowed)
    assert not host_allowed("example.com.evil.net", allowed)
    assert host_allowed("anything.net", [])


# --- per-request helpers ---------------------------------------------------------------------


def _request(urls: list[str]) -> ChatCompletionRequest:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "look"}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return ChatCompletionRequest.model_validate(
        {"model": "mini", "messages": [{"role": "user", "content": parts}]}
    )


def test_too_many_images() -> None:
    req = _request([data_url(encode(red()))] * 5)
    with pytest.raises(APIError) as exc:
        check_image_count(req.messages, Policy(max_images_per_request=4))
    assert exc.value.param == "messages" and "at most 4" in exc.value.message
    assert check_image_count(req.messages, Policy(max_images_per_request=5)) == 5


def test_load_request_images_in_order_with_params() -> None:
    blue = encode(Image.new("RGB", (2, 2), (0, 0, 255)))
    req = _request([data_url(encode(red())), data_url(blue)])
    images = run(load_request_images(req.messages, Policy()))
    assert [im.size for im in images] == [(8, 6), (2, 2)]
    bad = _request([data_url(encode(red())), "data:image/png;base64,!!"])
    refused(
        load_request_images(bad.messages, Policy()), param="messages[0].content[2].image_url.url"
    )
