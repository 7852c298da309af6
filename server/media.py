"""Images in requests: decoding, and the policy for fetching them.

Owns `load_image(url, settings, param=...)` → an RGB `PIL.Image`, from a
`data:image/<png|jpeg|webp|gif|bmp>;base64,...` URL or, only when the server allows remote
images, an `http(s)://` URL; `decode_image` (bytes → RGB, with the pixel cap checked from the
header before any pixel is decoded); and the per-request helpers `image_parts`,
`check_image_count` and `load_request_images`.

Fetch policy (server-side request forgery is the threat): http and https only; URLs with
credentials refused; the host must be on `allowed_media_domains` when that list is set (a
subdomain of an entry counts); every address the host resolves to must be public (private,
loopback, link-local, multicast, reserved, unspecified, shared, and IPv4 embedded in IPv6 all
refused); the connection goes to the address that was checked (the URL is pinned to the IP,
with `Host` and TLS SNI set to the name, so a second DNS answer cannot swap it); redirects are
followed by hand, at most 3, each hop checked like the first; one timeout covers all hops; the
body is counted while it streams and cut at `max_image_bytes`; proxies from the environment are
ignored. Resolution is injectable (`resolve=`) so tests run without a network.

Every failure is an `APIError` 400 whose `param` is the one the caller passes (the content
part, e.g. `messages[0].content[1].image_url.url`) and whose message says how to fix it. It
deliberately does not resize or tokenize images (the model's processor does) and does not cache
downloads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Protocol
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import APIError, bad_request
from server.protocol import ChatMessage, ImagePart

#: Image formats we decode (Pillow plugin names); nothing more exotic reaches a decoder.
FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
#: Media types accepted in data: URLs.
DATA_MEDIA_TYPES: frozenset[str] = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp"}
)
MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)

#: `(host, port) -> addresses`: how a host name is resolved (injectable for tests).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class MediaSettings(Protocol):
    """The settings this module reads (`ServeSettings` has them all)."""

    max_images_per_request: int
    max_image_pixels: int
    max_image_bytes: int
    allow_remote_images: bool
    allowed_media_domains: list[str]
    remote_timeout_s: float


# --- Entry points ---------------------------------------------------------------------------------


async def load_image(
    url: str,
    settings: MediaSettings,
    param: str | None = None,
    *,
    client: httpx.AsyncClient | None = None,
    resolve: Resolver | None = None,
) -> Image.Image:
    """The image at `url` as RGB. Raises `APIError` 400 (with `param`) for anything refused.

    `client`: a shared `httpx.AsyncClient` for remote images (it must not use a proxy; redirects
    are handled here whatever its setting); default: a fresh one per call. `resolve`: host name
    resolution (default: the system resolver).
    """
    url = url.strip()
    scheme = url[: url.find(":")].lower() if ":" in url[:12] else ""
    if scheme == "data":
        data = _decode_data_url(url, settings, param)
    elif scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise bad_request(
                "Remote image URLs are disabled on this server; send the image inline as a "
                "data:image/png;base64,... URL, or start the server with --allow-remote-images.",
                param,
                code="remote_images_disabled",
            )
        data = await fetch_image_bytes(url, settings, param, client=client, resolve=resolve)
    else:
        shown = f"'{scheme}:'" if scheme else "a relative or schemeless URL"
        remote = " or an http(s) URL" if settings.allow_remote_images else ""
        raise bad_request(
            f"Image URLs with {shown} are not accepted; send a data:image/...;base64 URL{remote}.",
            param,
            code="unsupported_image_url",
        )
    return await asyncio.to_thread(decode_image, data, settings.max_image_pixels, param)


def image_parts(messages: Sequence[ChatMessage]) -> Iterator[tuple[str, ImagePart]]:
    """Every image part in document order, with its param path (`messages[i].content[j]`)."""
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    yield f"messages[{i}].content[{j}]", part


def check_image_count(messages: Sequence[ChatMessage], settings: MediaSettings) -> int:
    """The number of images in the request; 400 when over `max_images_per_request`."""
    count = sum(1 for _ in image_parts(messages))
    limit = settings.max_images_per_request
    if count > limit:
        raise bad_request(
            f"This request has {count} images; this server accepts at most {limit} per request "
            "(--max-images-per-request). Send fewer images.",
            "messages",
            code="too_many_images",
        )
    return count


async def load_request_images(
    messages: Sequence[ChatMessage],
    settings: MediaSettings,
    *,
    client: httpx.AsyncClient | None = None,
    resolve: Resolver | None = None,
) -> list[Image.Image]:
    """All images of a request in document order (count checked first, then loaded together).
    The first failure is raised; the other loads are cancelled."""
    check_image_count(messages, settings)
    loads = [
        load_image(
            part.image_url.url, settings, f"{path}.image_url.url", client=client, resolve=resolve
        )
        for path, part in image_parts(messages)
    ]
    if not loads:
        return []
    tasks = [asyncio.ensure_future(c) for c in loads]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


# --- Decoding ------------------------------------------------------------------------------------


def _decode_data_url(url: str, settings: MediaSettings, param: str | None) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise bad_request(
            "Malformed data URL (no ','); send data:image/png;base64,<base64 bytes>.",
            param,
            code="invalid_data_url",
        )
    fields = [f.strip().lower() for f in header[len("data:") :].split(";")]
    media_type, options = fields[0], fields[1:]
    if media_type not in DATA_MEDIA_TYPES:
        raise bad_request(
            f"Unsupported data URL media type '{media_type[:50] or 'none'}'; send image/png, "
            "image/jpeg, image/webp, image/gif or image/bmp.",
            param,
            code="unsupported_image_type",
        )
    if "base64" not in options:
        raise bad_request(
            "Data URLs must be base64-encoded: data:image/png;base64,<base64 bytes>.",
            param,
            code="invalid_data_url",
        )
    text = "".join(payload.split())  # line breaks and spaces some encoders insert
    if len(text) * 3 // 4 > settings.max_image_bytes + 3:
        raise _too_large(settings.max_image_bytes, param)
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(
            "The image data is not valid base64; encode the file bytes with standard base64.",
            param,
            code="invalid_base64",
        ) from None
    if not data:
        raise bad_request("The data URL holds no image bytes.", param, code="invalid_image")
    if len(data) > settings.max_image_bytes:
        raise _too_large(settings.max_image_bytes, param)
    return data


def decode_image(data: bytes, max_pixels: int, param: str | None = None) -> Image.Image:
    """Encoded bytes → a fully decoded RGB image (alpha composited on white, EXIF rotation
    applied). The pixel cap is checked from the header, before pixels are decoded; truncated or
    corrupt data fails here rather than later in the model's processor."""
    # Image.open reads the header only. Pillow's own bomb check (a warning over 89 Mpx, an error
    # over 179 Mpx, process-wide settings we leave alone) is looser than ours, which follows.
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise _bomb(None, max_pixels, param) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise bad_request(
            "The data is not an image this server can read; send PNG, JPEG, WebP, GIF or BMP.",
            param,
            code="invalid_image",
        ) from None
    width, height = img.size
    if width < 1 or height < 1:
        raise bad_request("The image has no pixels.", param, code="invalid_image")
    if width * height > max_pixels:
        raise _bomb((width, height), max_pixels, param)
    try:
        img.load()  # decodes everything now: a truncated file fails here
    except Image.DecompressionBombError:
        raise _bomb((width, height), max_pixels, param) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError):
        raise bad_request(
            "The image is truncated or corrupt and could not be decoded; send the whole file.",
            param,
            code="invalid_image",
        ) from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # broken EXIF metadata is not worth refusing the image for
        pass
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB") if img.mode != "RGB" else img
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _bomb(size: tuple[int, int] | None, max_pixels: int, param: str | None) -> APIError:
    what = f"{size[0]}×{size[1]} pixels" if size else "too many pixels"
    return bad_request(
        f"The image has {what}, over this server's limit of {max_pixels} pixels "
        "(--max-image-pixels); downscale it before sending.",
        param,
        code="image_too_large",
    )


def _too_large(limit: int, param: str | None) -> APIError:
    return bad_request(
        f"The image is larger than this server's limit of {limit} bytes "
        "(--max-image-bytes); send a smaller or more compressed image.",
        param,
        code="image_too_large",
    )


# --- Remote fetch --------------------------------------------------------------------------------


async def system_resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (IPv4 and IPv6)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True only for globally routable unicast addresses, IPv4 embedded in IPv6 included."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or (ip.teredo[1] if ip.teredo else None) or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
        if ip.scope_id:
            return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether `host` is on the allowlist (an entry or a subdomain of one); empty list: any."""
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in allowed)


async def fetch_image_bytes(
    url: str,
    settings: MediaSettings,
    param: str | None = None,
    *,
    client: httpx.AsyncClient | None = None,
    resolve: Resolver | None = None,
) -> bytes:
    """The body at `url` under the fetch policy (see the module docstring)."""
    timeout = settings.remote_timeout_s
    own = client is None
    if client is None:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False
        )
    try:
        return await asyncio.wait_for(
            _fetch(url, settings, param, client, resolve or system_resolve), timeout
        )
    except asyncio.TimeoutError:
        raise bad_request(
            f"The image URL did not answer within {timeout:g} s; send the image inline as a "
            "data: URL or use a faster host.",
            param,
            code="image_fetch_timeout",
        ) from None
    finally:
        if own:
            await client.aclose()


async def _fetch(
    url: str,
    settings: MediaSettings,
    param: str | None,
    client: httpx.AsyncClient,
    resolve: Resolver,
) -> bytes:
    current = url
    for hop in range(MAX_REDIRECTS + 1):
        target, host_header, sni = await _checked_target(current, settings, param, resolve, hop)
        request = client.build_request(
            "GET",
            target,
            # identity: the byte cap then counts what is stored (no gzip bomb to inflate).
            headers={"Host": host_header, "Accept": "image/*", "Accept-Encoding": "identity"},
            extensions={"sni_hostname": sni} if sni else {},
        )
        try:
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.TimeoutException:
            raise asyncio.TimeoutError from None
        except httpx.HTTPError:
            raise _fetch_failed("could not connect to the image host", param) from None
        try:
            if response.status_code in _REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise _fetch_failed("the image URL redirected without a Location", param)
                current = str(httpx.URL(current).join(location))
                continue
            if response.status_code != 200:
                raise _fetch_failed(f"the image URL answered HTTP {response.status_code}", param)
            return await _read_capped(response, settings.max_image_bytes, param)
        finally:
            await response.aclose()
    raise _fetch_failed(f"the image URL redirected more than {MAX_REDIRECTS} times", param)


async def _checked_target(
    url: str, settings: MediaSettings, param: str | None, resolve: Resolver, hop: int
) -> tuple[httpx.URL, str, str | None]:
    """Checks one hop; returns (URL pinned to a checked IP, Host header, TLS SNI name)."""
    where = "redirected to" if hop else "points to"
    try:
        parts = urlsplit(url)
        parsed = httpx.URL(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        host = parsed.raw_host.decode("ascii").lower().rstrip(".")  # IDNA, like the allowlist
    except (ValueError, httpx.InvalidURL):
        raise _refused(f"the image URL {where} an invalid URL", param) from None
    if parsed.scheme not in ("http", "https"):
        raise _refused(
            f"the image URL {where} a '{parsed.scheme[:20]}:' URL; only http and https are fetched",
            param,
        )
    if parts.username is not None or parts.password is not None:
        raise _refused("image URLs with credentials are not accepted", param)
    if not host:
        raise _refused(f"the image URL {where} a URL without a host", param)
    try:
        literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    private = _refused(
        f"the image URL {where} a private, loopback or otherwise non-public address", param
    )
    if literal is not None and not is_public_address(literal):
        raise private
    if not host_allowed(host, settings.allowed_media_domains):
        raise bad_request(
            f"The image URL {where} host '{host[:100]}', which is not on this server's "
            "list of allowed media domains (--allowed-media-domains); use an allowed host or "
            "send the image inline as a data: URL.",
            param,
            code="image_domain_not_allowed",
        )
    if literal is not None:
        addresses = [literal]
    else:
        try:
            answers = await resolve(host, port)
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in answers]
        except (OSError, ValueError, UnicodeError):
            addresses = []
        if not addresses:
            raise _fetch_failed(f"the image host '{host[:100]}' could not be resolved", param)
    if not all(is_public_address(a) for a in addresses):
        raise private
    pinned = parsed.copy_with(host=str(addresses[0]))
    default_port = port == (443 if parsed.scheme == "https" else 80)
    name = f"[{host}]" if ":" in host else host
    host_header = name if default_port else f"{name}:{port}"
    sni = host if parsed.scheme == "https" and literal is None else None
    return pinned, host_header, sni


async def _read_capped(response: httpx.Response, limit: int, param: str | None) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, param)
    buf = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            buf += chunk
            if len(buf) > limit:
                raise _too_large(limit, param)
    except httpx.TimeoutException:
        raise asyncio.TimeoutError from None
    except httpx.HTTPError:
        raise _fetch_failed("the image download broke off", param) from None
    return bytes(buf)


def _refused(reason: str, param: str | None) -> APIError:
    return bad_request(
        f"Refused to fetch the image: {reason}. Send the image inline as a data: URL or host it "
        "on a public http(s) address.",
        param,
        code="image_url_refused",
    )


def _fetch_failed(reason: str, param: str | None) -> APIError:
    return bad_request(
        f"Could not fetch the image: {reason}. Check the URL, or send the image inline as a "
        "data: URL.",
        param,
        code="image_fetch_failed",
    )
