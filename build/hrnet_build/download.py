"""Resumable downloads into a cache, with a size check and a recorded SHA-256.

A file is fetched to ``<name>.part``; an interrupted download resumes from where it stopped
(HTTP ``Range``), and the finished file is moved into place only when its size equals what the
server announced. Its SHA-256 is then written beside it (``<name>.sha256``) and checked every
time the cached file is reused, so a file damaged on disk is noticed and fetched again.
PaddleClas publishes no checksums; pass ``sha256=`` to pin one.

Only https is fetched, redirects included; plain http is allowed for loopback hosts alone
(``127.0.0.1``, ``localhost``, ``::1``), so that tests and local mirrors can serve files.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from hrnet_core.errors import DownloadError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 30
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def secure_url(url: str) -> bool:
    """True for https, and for plain http to a loopback host (nothing on the way to tamper with it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return bool(parts.hostname)
    return parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS


class _SecureRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to URLs that :func:`secure_url` accepts."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not secure_url(newurl):
            raise DownloadError(
                f"{req.full_url} redirects to {newurl}, which is not https: refusing to follow it. "
                "Download from an https URL"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _total_size(resp, offset: int) -> int | None:
    """The full size of the resource, from Content-Range (206) or Content-Length (200)."""
    content_range = resp.headers.get("Content-Range")
    if resp.status == 206 and content_range:
        match = re.match(r"bytes (\d+)-(\d+)/(\d+)", content_range)
        if not match or int(match.group(1)) != offset:
            raise DownloadError(f"server answered a resume from byte {offset} with Content-Range {content_range!r}")
        return int(match.group(3))
    length = resp.headers.get("Content-Length")
    return int(length) if length is not None else None


def fetch(url: str, dest: str | os.PathLike[str], *, sha256: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (once), resuming a partial download; return ``dest``."""
    if not secure_url(url):
        raise DownloadError(
            f"{url}: refusing to download over plain http, where anyone on the way can change the file. "
            f"Use an https URL (plain http is accepted only for {', '.join(sorted(LOOPBACK_HOSTS))})"
        )
    dest = Path(dest)
    stamp = dest.with_name(dest.name + ".sha256")
    if dest.is_file():
        recorded = stamp.read_text().strip() if stamp.is_file() else None
        want = sha256 or recorded
        actual = sha256_file(dest)
        if want is None or actual == want:
            if recorded is None:
                stamp.write_text(actual + "\n")
            log.info("using cached %s (sha256 %s)", dest, actual[:12])
            return dest
        log.warning("cached %s has sha256 %s, expected %s: fetching it again", dest, actual[:12], want[:12])
        dest.unlink()

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.build_opener(_SecureRedirects).open(request, timeout=TIMEOUT_S) as resp:
            if offset and resp.status != 206:
                log.info("server does not resume downloads; starting %s again", dest.name)
                offset = 0
            total = _total_size(resp, offset)
            _copy(resp, part, offset, total, dest.name, progress)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the .part is already complete (or longer than the file)
            part.unlink()
            return fetch(url, dest, sha256=sha256, progress=progress)
        raise DownloadError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        have = part.stat().st_size if part.is_file() else 0
        raise DownloadError(
            f"cannot download {url} ({reason}); {have} bytes kept in {part} and resumed on the next try. "
            "Without internet access, download the file elsewhere and pass its path with --weights, "
            "or use --weights offline for calibrated stand-in weights"
        ) from err

    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"download of {url} stopped at {size} of {total} bytes; run the command again to resume")
    actual = sha256_file(part)
    if sha256 is not None and actual != sha256:
        part.unlink()
        raise DownloadError(f"{url} has sha256 {actual}, expected {sha256}: the download was discarded")
    os.replace(part, dest)
    stamp.write_text(actual + "\n")
    log.info("downloaded %s (%d bytes, sha256 %s)", dest, size, actual[:12])
    return dest


def _copy(resp, part: Path, offset: int, total: int | None, label: str, progress: bool) -> None:
    from tqdm import tqdm

    mode = "ab" if offset else "wb"
    with (
        open(part, mode) as out,
        tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=label, disable=not progress, leave=False
        ) as bar,
    ):
        for block in iter(lambda: resp.read(CHUNK), b""):
            out.write(block)
            bar.update(len(block))
