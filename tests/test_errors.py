"""Errors that name the real cause and the path, and no silent acceptance: syntax vs schema errors, UTF-8
offsets, duplicate imp ids, strict /predict records and /admin/reload options, 404/405 as counted JSON."""
from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from bidder.app import DEFAULT_CAMPAIGNS, Config, create_app
from bidder.openrtb import PredictRecord, RequestError, decode_predict, decode_request
from bidder.scorer import Scorer
from bidder.spec import RAW_FIELDS, TIMESTAMP_KEY
from oracle import metric


@pytest.fixture
async def client(aiohttp_client, small_bundle):
    return await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS)))


def refused(body: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        decode_request(body)
    return info.value


# --- /bid: the cause and the path ----------------------------------------------------------------------

def test_valid_json_of_the_wrong_shape_is_not_called_invalid_json():
    error = refused(b'{"imp": [{"id": "1"}]}')
    assert (error.message, error.path) == ("Object missing required field `id`", "$.id")
    error = refused(b'{"id": "r", "imp": [{"id": "1", "banner": {"w": "300"}}]}')
    assert not error.message.startswith("invalid JSON") and error.path == "$.imp[0].banner.w"


def test_a_syntax_error_is_invalid_json():
    error = refused(b'{"id": "r", "imp": [')
    assert error.message.startswith("invalid JSON: ") and error.path == "$"


def test_non_utf8_inside_a_string_names_the_body_offset_and_the_field():
    body = b'{"id": "r", "imp": [{"id": "1", "tagid": "slot-\xff-7"}]}'
    error = refused(body)
    assert error.path == "$.imp[0].tagid"
    offset = body.index(b"\xff")
    assert f"byte 0xff at offset {offset}" in error.message


def test_non_utf8_in_a_key_or_outside_strings():
    body = b'{"id": "r", "imp": [{"id": "1", "banner": {"w\xe9": 3}}], "site": {"page": "\xc3("}}'
    error = refused(body)
    assert error.path == "$.imp[0].banner" and "a key of the object" in error.message
    offset = body.index(b"\xe9")
    assert f"offset {offset}" in error.message
    error = refused(b'\xef\xbb{"id": "r"}')
    assert error.path == "$" and "offset 0" in error.message and "UTF-8" in error.message


def test_duplicate_imp_ids_are_refused():
    body = {"id": "r", "imp": [{"id": "1"}, {"id": "2"}, {"id": "1"}]}
    error = refused(json.dumps(body).encode())
    assert error.path == "$.imp[2].id" and "duplicate imp id '1'" in error.message and "$.imp[0].id" in error.message


async def test_duplicate_imp_ids_get_400_over_http(client, openrtb_examples):
    request = json.loads(openrtb_examples["bid-request-2.5/simple-banner.json"])
    request["imp"].append(dict(request["imp"][0]))
    response = await client.post("/bid", json=request)
    assert response.status == 400 and (await response.json())["path"] == "$.imp[1].id"


# --- /predict: strict records ----------------------------------------------------------------------------

def test_predict_accepts_exactly_the_raw_fields_and_timestamp():
    assert set(PredictRecord.__struct_fields__) == set(RAW_FIELDS) | {TIMESTAMP_KEY}


@pytest.mark.parametrize("record,path", [
    ({"useragnet": "Mozilla/5.0"}, "$.records[0].useragnet"),
    ({"hour": "fourteen"}, "$.records[0].hour"),
    ({"hour": 24}, "$.records[0].hour"),
    ({"weekday": 7}, "$.records[0].weekday"),
    ({"weekday": True}, "$.records[0].weekday"),
    ({"hour": 14.5}, "$.records[0].hour"),
    ({"slotprice": "cheap"}, "$.records[0].slotprice"),
    ({"slotwidth": [300]}, "$.records[0].slotwidth"),
    ({"usertag": [["10006"]]}, "$.records[0].usertag[0]"),
    ({"IP": 1234}, "$.records[0].IP"),
    ({"timestamp": "yesterday"}, "$.records[0].timestamp"),
])
async def test_predict_refuses_unknown_keys_and_wrong_types(client, record, path):
    response = await client.post("/predict", json={"records": [record]})
    assert response.status == 400
    answer = await response.json()
    assert answer["path"] == path and answer["error"]
    assert "regex" not in answer["error"]  # plain words, not the pattern


async def test_predict_names_the_field_the_featurizer_refuses(client):
    response = await client.post("/predict", json={"records": [{}, {"timestamp": "20131306141502"}]})
    assert response.status == 400
    answer = await response.json()
    assert answer["path"] == "$.records[1].timestamp" and "timestamp" in answer["error"]


async def test_predict_unknown_top_level_keys_are_refused(client):
    response = await client.post("/predict", json={"records": [], "model": "x"})
    assert response.status == 400 and (await response.json())["path"] == "$.model"


async def test_log_strings_and_typed_values_score_alike(client, small_bundle):
    """What an iPinYou log line gives (strings, "" for missing) is accepted and scores like typed values."""
    log_style = {"weekday": "3", "hour": "14", "region": "80", "city": "85", "adexchange": "2",
                 "slotwidth": "300", "slotheight": "250", "slotprice": "50", "advertiser": "1458",
                 "usertag": "10006,10024", "url": "", "timestamp": "20130606141502123"}
    typed = {"weekday": 3, "hour": 14, "region": 80, "city": 85, "adexchange": 2, "slotwidth": 300,
             "slotheight": 250, "slotprice": 50, "advertiser": 1458, "usertag": ["10006", "10024"],
             "timestamp": 1370528102}
    response = await client.post("/predict", data=msgspec.json.encode({"records": [log_style, typed]}))
    assert response.status == 200, await response.text()
    first, second = (await response.json())["ctr"]
    assert first == second
    records = decode_predict(msgspec.json.encode({"records": [typed]}))
    np.testing.assert_array_equal(Scorer(small_bundle).predict(records), Scorer(small_bundle).predict([typed]))


# --- /admin/reload ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,path", [({"modle": "x"}, "$.modle"), ({"model": 1}, "$.model"),
                                          ({"campaigns": ["a"]}, "$.campaigns")])
async def test_reload_refuses_unknown_keys_and_wrong_types_without_reloading(client, options, path):
    response = await client.post("/admin/reload", json=options)
    assert response.status == 400
    answer = await response.json()
    assert answer["path"] == path and answer["error"].startswith("invalid reload request: ")
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_reloads_total", result="ok") == 0


# --- no route --------------------------------------------------------------------------------------------

async def test_404_and_405_answer_json_and_are_counted(client):
    missing = await client.get("/nope")
    assert missing.status == 404 and missing.content_type == "application/json"
    assert (await missing.json())["error"] == "no route /nope"
    wrong = await client.get("/bid")
    assert wrong.status == 405 and wrong.headers["Allow"] == "POST"
    assert "GET is not allowed on /bid" in (await wrong.json())["error"]
    assert (await client.put("/metrics")).status == 405
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_errors_total", kind="not_found") == 1
    assert metric(text, "bidder_errors_total", kind="method_not_allowed") == 2
    assert metric(text, "bidder_responses_total", route="unmatched", status="404") == 1
    assert metric(text, "bidder_responses_total", route="unmatched", status="405") == 2
