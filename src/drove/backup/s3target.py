"""A target in an S3 bucket (AWS, Ceph radosgw, MinIO...)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterable, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
)

from drove.backup.errors import NotFoundError, TargetError
from drove.backup.target import Target, check_key

_DELETE_BATCH = 1000  # the most keys one DeleteObjects request may carry
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_REFUSED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_PRECONDITION = {"412", "PreconditionFailed"}


def _config(attempts: int) -> Config:
    """Client settings: path-style URLs and bounded retries.

    Only compute request checksums where the API requires them: S3 look-alikes (older
    radosgw, MinIO) reject the CRC trailers that boto3 >= 1.36 sends by default.
    """
    return Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": attempts, "mode": "standard"},
        max_pool_connections=16,
        connect_timeout=10,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def _add_content_md5(request, **_kwargs) -> None:
    """Give DeleteObjects the Content-MD5 that S3 look-alikes still insist on."""
    body = request.body
    if isinstance(body, str):
        body = body.encode()
    if body and "Content-MD5" not in request.headers:
        request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def _code(e: ClientError) -> str:
    """The S3 error code of ``e`` (HTTP status as a string when there is none)."""
    err = e.response.get("Error", {})
    return str(err.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


class S3Target(Target):
    """Objects in ``bucket`` under ``prefix``; S3 puts are atomic and durable when acked."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 region: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None):
        if not bucket:
            raise ValueError("S3 target needs a bucket name")
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither "
                             "(to use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self._prefix = f"{prefix}/" if prefix else ""
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._where = endpoint or f"AWS S3 ({region or 'us-east-1'})"
        region = region or "us-east-1"
        # Sessions are not thread-safe but clients are: build one client, share it.
        session = boto3.session.Session()
        kwargs = {"endpoint_url": endpoint, "region_name": region,
                  "aws_access_key_id": access_key, "aws_secret_access_key": secret_key}
        self._client = session.client("s3", config=_config(5), **kwargs)
        self._client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
        # The bucket check retries less: a wrong endpoint should fail in seconds, not after
        # the long backoff meant to ride out a brief outage during a backup.
        checker = session.client("s3", config=_config(2), **kwargs)
        try:
            self._check_bucket(checker)
        finally:
            checker.close()

    def _check_bucket(self, client) -> None:
        """TargetError saying what to fix unless the bucket is there and usable."""
        b = self.bucket
        try:
            client.head_bucket(Bucket=b)
        except ClientError as e:
            code = _code(e)
            if code in _NOT_FOUND:
                raise TargetError(f"bucket '{b}' does not exist at {self._where}: "
                                  "create it first") from None
            if code in _REFUSED:
                raise TargetError(f"access to bucket '{b}' at {self._where} was refused "
                                  f"({code}): check the access key and secret key") from None
            raise TargetError(f"bucket '{b}' at {self._where} cannot be used: {e}") from None
        except NoCredentialsError:
            raise TargetError("no S3 credentials: give an access key and secret key, or set "
                              "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        except (EndpointConnectionError, ConnectTimeoutError) as e:
            raise TargetError(f"cannot reach {self._where}: {e}; check the endpoint URL and "
                              "that the S3 service is running") from None
        except BotoCoreError as e:
            raise TargetError(f"bucket '{b}' at {self._where} cannot be used: {e}") from None

    @contextlib.contextmanager
    def _errors(self, what: str, key: str) -> Iterator[None]:
        """Turn boto errors into TargetError naming the operation and key."""
        try:
            yield
        except ClientError as e:
            raise TargetError(f"S3 {what} of {key} in {self.url} failed: {e}") from e
        except BotoCoreError as e:
            raise TargetError(f"S3 {what} of {key} in {self.url} failed: {e}") from e

    def _key(self, key: str) -> str:
        """The object key of ``key`` in the bucket."""
        return self._prefix + check_key(key)

    def put(self, key: str, data: bytes) -> None:
        """PutObject (atomic by S3 semantics)."""
        with self._errors("put", key):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def replace(self, key: str, data: bytes, version: str | None = None) -> str | None:
        """PutObject with If-Match on the object's ETag: S3 applies the condition and the
        write as one step, so a deleted object is never recreated (a missing object
        answers 404, or 412 on radosgw).

        Why two holders never both believe they hold a lock: a lock key is written only
        by its holder and removed only by an exclusive acquirer that saw its ``refreshed``
        time older than the stale time.  The holder gives up 1.5 refresh intervals before
        that, and a refresh that lands after its deadline counts as lost, so with clocks
        agreeing within that margin the holder has stopped before anyone deletes its lock.
        The condition covers the rest (clocks further apart, a lock removed by hand): a
        delete applied before this put makes it fail, so the holder learns of it at its
        next refresh instead of resurrecting the lock unawares; a put applied before the
        delete goes with it, and the next refresh or check finds the lock gone.

        Without ``version`` the ETag comes from a HEAD first (a 404 there: None).  The
        tag is sent as the server gave it (quoted) and, on 412, once unquoted: radosgw
        compares the bare hex.  A 412 where the object now holds ``data`` exactly is our
        own put retried by botocore after a lost reply, so it counts as written.
        """
        obj = self._key(key)
        with self._errors("replace", key):
            if version is None:
                try:
                    version = self._client.head_object(Bucket=self.bucket, Key=obj)["ETag"]
                except ClientError as e:
                    if _code(e) in _NOT_FOUND:
                        return None
                    raise
            for tag in dict.fromkeys((version, version.strip('"'))):
                try:
                    resp = self._client.put_object(Bucket=self.bucket, Key=obj, Body=data,
                                                   IfMatch=tag)
                except ClientError as e:
                    code = _code(e)
                    if code in _NOT_FOUND:
                        return None
                    if code not in _PRECONDITION:
                        raise
                    continue
                return str(resp["ETag"])
            return self._written_by_us(obj, data)

    def _written_by_us(self, obj: str, data: bytes) -> str | None:
        """The ETag of ``obj`` if it holds exactly ``data`` (our own retried put), else None."""
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=obj)
        except ClientError as e:
            if _code(e) in _NOT_FOUND:
                return None
            raise
        with resp["Body"] as body:
            return str(resp["ETag"]) if body.read() == data else None

    def get(self, key: str) -> bytes:
        """GetObject; NotFoundError for a missing key."""
        with self._errors("get", key):
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if _code(e) in _NOT_FOUND:
                    raise NotFoundError(f"{key} does not exist in {self.url}") from None
                raise
            with resp["Body"] as body:
                return body.read()

    def exists(self, key: str) -> bool:
        """HeadObject."""
        with self._errors("head", key):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if _code(e) in _NOT_FOUND:
                    return False
                raise
            return True

    def list(self, prefix: str) -> Iterator[str]:
        """ListObjectsV2 pages under ``prefix``."""
        for key, _ in self.list_sizes(prefix):
            yield key

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        """ListObjectsV2 pages under ``prefix``, with object sizes."""
        strip = len(self._prefix)
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._prefix + prefix)
        with self._errors("list", prefix or "/"):
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield obj["Key"][strip:], obj["Size"]

    def delete(self, key: str) -> None:
        """DeleteObject (S3 does not mind absent keys)."""
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_many(self, keys: Iterable[str]) -> None:
        """DeleteObjects, up to 1000 keys per request."""
        batch: list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) == _DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        """One DeleteObjects request; TargetError if any key could not be deleted."""
        objects = [{"Key": self._key(k)} for k in keys]
        with self._errors("delete", f"{len(keys)} keys"):
            resp = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise TargetError(f"S3 delete of {len(errors)} keys in {self.url} failed, e.g. "
                              f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}")

    def sync(self) -> None:
        """Nothing to do: S3 acknowledges a put only once it is durable."""

    def close(self) -> None:
        """Close the client's connection pool."""
        self._client.close()
