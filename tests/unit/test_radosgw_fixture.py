"""The radosgw test fixture (tests/radosgw.py) serves real S3 that boto3 can use."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from radosgw import RadosGW, radosgw  # noqa: F401  (radosgw: the session fixture)

MiB = 1 << 20


def _error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return exc.value.response["Error"]["Code"]


@pytest.mark.slow
def test_s3_round_trip(radosgw: RadosGW) -> None:  # noqa: F811 (the fixture)
    s3 = radosgw.client()
    bucket = radosgw.make_bucket("fixture-roundtrip")
    assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]

    # A plain 8 MiB object comes back byte for byte.
    small = os.urandom(8 * MiB)
    s3.put_object(Bucket=bucket, Key="dir/small", Body=small)
    assert s3.get_object(Bucket=bucket, Key="dir/small")["Body"].read() == small

    # A 20 MiB multipart upload: parts of 8 + 8 + 4 MiB.
    big = os.urandom(20 * MiB)
    mpu = s3.create_multipart_upload(Bucket=bucket, Key="dir/big")
    parts = []
    for number, offset in enumerate(range(0, len(big), 8 * MiB), start=1):
        part = s3.upload_part(Bucket=bucket, Key="dir/big", UploadId=mpu["UploadId"],
                              PartNumber=number, Body=big[offset:offset + 8 * MiB])
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
    s3.complete_multipart_upload(Bucket=bucket, Key="dir/big", UploadId=mpu["UploadId"],
                                 MultipartUpload={"Parts": parts})
    got = s3.get_object(Bucket=bucket, Key="dir/big")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()

    listing = s3.list_objects_v2(Bucket=bucket, Prefix="dir/")["Contents"]
    assert {o["Key"]: o["Size"] for o in listing} == {"dir/small": 8 * MiB, "dir/big": 20 * MiB}

    # Unauthenticated, wrong-secret and unknown-key requests are all refused.
    anonymous = radosgw.client(config=Config(signature_version=UNSIGNED,
                                             s3={"addressing_style": "path"}))
    with pytest.raises(ClientError) as exc:
        anonymous.get_object(Bucket=bucket, Key="dir/small")
    assert _error_code(exc) == "AccessDenied"
    with pytest.raises(ClientError) as exc:
        anonymous.put_object(Bucket=bucket, Key="intruder", Body=b"x")
    assert _error_code(exc) == "AccessDenied"
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(f"{radosgw.endpoint}/{bucket}/dir/small", timeout=10)
    assert http.value.code == 403
    wrong_secret = radosgw.client(aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError) as exc:
        wrong_secret.list_objects_v2(Bucket=bucket)
    assert _error_code(exc) == "SignatureDoesNotMatch"
    unknown_key = radosgw.client(aws_access_key_id="NOSUCHKEY0000000000")
    with pytest.raises(ClientError) as exc:
        unknown_key.put_object(Bucket=bucket, Key="intruder", Body=b"x")
    assert _error_code(exc) == "InvalidAccessKeyId"

    # Delete: the objects, then the bucket.
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "dir/small"},
                                                         {"Key": "dir/big"}]})
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    s3.delete_bucket(Bucket=bucket)
    with pytest.raises(ClientError) as exc:
        s3.head_bucket(Bucket=bucket)
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


@pytest.mark.slow
def test_own_instance_starts_idempotently_and_stops_everything(tmp_path: Path) -> None:
    with RadosGW(tmp_path / "rgw") as gw:
        pids = gw.pids()
        assert set(pids) == {"mon", "mgr", "osd", "rgw"}
        gw.start()  # already running: a no-op
        assert gw.pids() == pids
        s3 = boto3.client("s3", endpoint_url=gw.endpoint, aws_access_key_id=gw.access_key,
                          aws_secret_access_key=gw.secret_key, region_name=gw.region,
                          config=Config(s3={"addressing_style": "path"}))
        s3.create_bucket(Bucket="own")
        s3.put_object(Bucket="own", Key="k", Body=b"v")
        assert s3.get_object(Bucket="own", Key="k")["Body"].read() == b"v"
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} still running after stop()"
    assert gw._our_strays() == []
    assert not (tmp_path / "rgw" / "osd").exists()  # the OSD block file is freed
