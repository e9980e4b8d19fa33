"""The URLs that name gemmaq's Redis (a Sentinel group or one server) and PostgreSQL (one host
or libpq's list of hosts), as the settings take them and the clients are given them."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from core import redis_target
from core.settings import sqlalchemy_url

pytestmark = pytest.mark.unit


def test_a_sentinel_url_names_the_sentinels_the_service_and_both_passwords() -> None:
    url = (
        "redis+sentinel://:m%40ster@10.0.0.1:26380,10.0.0.2,sentinel-3:5000/gemmaq/2?sentinel_password=s3cret"
    )
    target = redis_target.parse(url)
    assert target.via_sentinel
    assert target.sentinels == (("10.0.0.1", 26380), ("10.0.0.2", 26379), ("sentinel-3", 5000))
    assert (target.service, target.db, target.password, target.sentinel_password) == (
        "gemmaq",
        2,
        "m@ster",
        "s3cret",
    )
    broker, options = redis_target.kombu_broker(url)
    assert broker == (
        "sentinel://:m%40ster@10.0.0.1:26380/2;sentinel://:m%40ster@10.0.0.2:26379/2;sentinel://:m%40ster@sentinel-3:5000/2"
    )
    assert options["master_name"] == "gemmaq" and options["sentinel_kwargs"]["password"] == "s3cret"


def test_a_plain_redis_url_is_left_as_it_is() -> None:
    url = "redis://:pw@127.0.0.1:6379/0"
    assert not redis_target.parse(url).via_sentinel
    assert redis_target.kombu_broker(url) == (url, {})


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h1:26379",  # no service
        "redis+sentinel://h1:26379/gemmaq/zero",
        "redis+sentinel://h1:port/gemmaq",
        "redis+sentinel://h1/gemmaq?master_password=x",
    ],
)
def test_a_malformed_sentinel_url_is_refused_naming_the_part(url: str) -> None:
    with pytest.raises(ValueError, match="redis\\+sentinel URL"):
        redis_target.parse(url)


def test_libpqs_multi_host_url_becomes_the_form_sqlalchemy_takes() -> None:
    url = "postgresql://gemmaq:pw@db-a:5432,db-b:5433/gemmaq?target_session_attrs=read-write"
    converted = sqlalchemy_url(url)
    assert converted == (
        "postgresql+psycopg://gemmaq:pw@/gemmaq?host=db-a:5432&host=db-b:5433&target_session_attrs=read-write"
    )
    parsed = make_url(converted)
    assert parsed.query["host"] == ("db-a:5432", "db-b:5433") and parsed.database == "gemmaq"
    one = "postgresql://gemmaq@db:5432/gemmaq"
    assert sqlalchemy_url(one) == "postgresql+psycopg://gemmaq@db:5432/gemmaq"
