"""No raw user ids or secrets in logs, endpoints in them; TLS and ACL settings reach the
Kafka and Redis clients."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection

from features.connection import split_nodes
from shoprec.errors import ConfigError, describe
from shoprec.redact import user_ref
from shoprec.settings import Settings
from streams.topics import kafka_options, kafka_ssl_context


def settings(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg, arg-type]


def test_user_ref_is_stable_short_and_hides_the_id() -> None:
    ref = user_ref("541312140")
    assert ref == user_ref(b"541312140") and ref.startswith("u#") and len(ref) == 14
    assert "541312140" not in ref and ref != user_ref("541312141")
    assert user_ref(None) == "u#-"


def test_plaintext_kafka_has_no_tls() -> None:
    assert kafka_ssl_context(settings()) is None
    assert "ssl_context" not in kafka_options(settings())


def test_kafka_ssl_uses_the_configured_ca(tmp_path: Path) -> None:
    ca = ssl.get_default_verify_paths().cafile
    if ca is None:
        pytest.fail("the system has no CA bundle to use as a stand-in CA file")
    s = settings(kafka_security_protocol="SASL_SSL", kafka_ssl_cafile=ca, kafka_sasl_username="u")
    opts = kafka_options(s)
    assert isinstance(opts["ssl_context"], ssl.SSLContext)
    assert opts["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert opts["sasl_plain_username"] == "u"


def test_a_missing_tls_file_fails_naming_the_setting(tmp_path: Path) -> None:
    s = settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match="SHOPREC_KAFKA_SSL_CAFILE"):
        kafka_options(s)
    s = settings(kafka_security_protocol="SSL", kafka_ssl_keyfile="k.pem")
    with pytest.raises(ConfigError, match="without SHOPREC_KAFKA_SSL_CERTFILE"):
        kafka_ssl_context(s)


def test_redis_acl_user_and_tls_files_pass_through_the_url() -> None:
    url = "rediss://shop:pw@10.0.0.5:6380/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem"
    s = settings(redis_url=url)
    pool = Redis.from_url(s.redis_url.get_secret_value()).connection_pool
    assert pool.connection_class is SSLConnection
    kw = pool.connection_kwargs
    assert (kw["username"], kw["password"]) == ("shop", "pw")
    assert (kw["ssl_ca_certs"], kw["ssl_certfile"], kw["ssl_keyfile"]) == (
        "/ca.pem",
        "/c.pem",
        "/k.pem",
    )
    assert "pw" not in repr(s) and "pw" not in str(s.model_dump())


def test_infrastructure_errors_say_where_they_failed() -> None:
    """redis-py 8's repr is only a category; the log needs the endpoint."""
    exc = redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:7002.")
    assert repr(exc) == "network:ConnectionError"  # what the logs used to show
    assert describe(exc) == "ConnectionError: Error 111 connecting to 127.0.0.1:7002."
    assert describe(TimeoutError()) == "TimeoutError"
    with pytest.raises(ValueError) as bad:
        split_nodes("127.0.0.1:6379")  # no scheme; the message never quotes the URL
    assert "127.0.0.1" not in str(bad.value)
