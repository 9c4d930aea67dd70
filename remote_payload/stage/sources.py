"""Mirror URLs → plain HTTP(S) sources the downloader can range-read.

- `http(s)://...`: as is. A URL ending in `/` is a per-scene tree (`<url><scene>/transforms_*.json`
  and the frames they list); anything else is an archive (zip, tar, tar.gz, tar.xz, tar.bz2).
- `s3://bucket/key`: `$AWS_ENDPOINT_URL/bucket/key` when that is set (path style), a presigned
  URL when boto3 is importable and finds credentials, else the public virtual-hosted URL
  `https://bucket.s3[.region].amazonaws.com/key`.
- `hf://datasets/owner/name[@rev]/path`: the Hub's resolve URL (`$HF_ENDPOINT`, default
  huggingface.co; `huggingface_hub.hf_hub_url` when importable); `$HF_TOKEN` is sent as a
  bearer token that is never forwarded to a redirect target.
- `https://user:password@host/...`: the credentials go in a Basic header, never in logs.
- `{scene}` anywhere in a URL is replaced by the scene name (per-scene archives).
- `file://` mirrors live on the controller: the controller uploads them; the host skips them.
"""
from __future__ import annotations

import base64
import os
import urllib.parse
from dataclasses import dataclass, field

from .errors import StageError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")


@dataclass(frozen=True, slots=True)
class Source:
    mirror: str                 # as declared (after {scene} substitution)
    url: str                    # http(s) URL to range-read
    kind: str                   # "archive" | "tree"
    private_headers: dict[str, str] = field(default_factory=dict)

    @property
    def display(self) -> str:
        """What logs and progress lines show: the declared mirror without query or credentials."""
        p = urllib.parse.urlsplit(self.mirror)
        host = p.hostname or ""
        if p.port:
            host += f":{p.port}"
        return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))

    @property
    def archive_name(self) -> str:
        return urllib.parse.urlsplit(self.mirror).path.rstrip("/").rsplit("/", 1)[-1]

    def file_source(self, relpath: str) -> Source:
        """For a tree: the source of one file under it."""
        quoted = urllib.parse.quote(relpath)
        return Source(self.mirror.rstrip("/") + "/" + relpath, self.url + quoted, "file", self.private_headers)


def _s3_url(bucket: str, key: str) -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        return f"{endpoint.rstrip('/')}/{bucket}/{urllib.parse.quote(key)}"
    try:
        import boto3  # optional: private buckets
        session = boto3.session.Session()
        if session.get_credentials() is not None:
            return str(session.client("s3").generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=6 * 3600))
    except Exception:  # noqa: BLE001 - boto3 missing or misconfigured: fall back to the public URL
        pass
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    host = f"{bucket}.s3.{region}.amazonaws.com" if region else f"{bucket}.s3.amazonaws.com"
    return f"https://{host}/{urllib.parse.quote(key)}"


def _hf_url(rest: str) -> str:
    parts = rest.split("/")
    repo_type = "model"
    if parts and parts[0] in ("datasets", "spaces", "models"):
        repo_type = parts.pop(0).rstrip("s")
    if len(parts) < 3:
        raise StageError(f"hf:// mirror needs owner/name/path, got hf://{rest}")
    owner, name, path = parts[0], parts[1], "/".join(parts[2:])
    name, _, revision = name.partition("@")
    revision = revision or "main"
    trailing = "/" if path.endswith("/") else ""
    try:
        from huggingface_hub import hf_hub_url  # optional
        return str(hf_hub_url(f"{owner}/{name}", path.rstrip("/"), repo_type=repo_type,
                              revision=revision)) + trailing
    except ImportError:
        pass
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    return (f"{endpoint}/{prefix}{owner}/{name}/resolve/{urllib.parse.quote(revision, safe='')}/"
            f"{urllib.parse.quote(path.rstrip('/'))}{trailing}")


def resolve(mirror: str, scene: str) -> Source | None:
    """The source for one declared mirror, or None for a controller-side file:// path."""
    mirror = mirror.replace("{scene}", scene)
    scheme, _, rest = mirror.partition("://")
    scheme = scheme.lower()
    headers: dict[str, str] = {}
    if scheme == "file":
        return None
    if scheme in ("http", "https"):
        url = mirror
        parts = urllib.parse.urlsplit(mirror)
        if parts.username is not None:   # user:password@host → a Basic header, out of the URL
            cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
            host = parts.hostname or ""
            netloc = f"[{host}]" if ":" in host else host
            netloc += f":{parts.port}" if parts.port else ""
            url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    elif scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket or not key:
            raise StageError(f"s3 mirror needs s3://bucket/key, got {mirror}")
        url = _s3_url(bucket, key)
    elif scheme == "hf":
        url = _hf_url(rest)
        token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
    else:
        raise StageError(f"mirror {mirror!r}: unsupported scheme {scheme!r} "
                         "(use https://, http://, s3://, hf:// or file://)")
    kind = "tree" if urllib.parse.urlsplit(mirror).path.endswith("/") else "archive"
    return Source(mirror, url, kind, headers)
