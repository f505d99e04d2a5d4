"""OpenRTB at the edge without HTTP: typed decoding, mapping to raw records, response encoding."""
from __future__ import annotations

import calendar
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import msgspec

from bidder.openrtb import (weekday_hour, decode_predict, MAX_SLOTPRICE_FEN, USD_TO_CNY, Bid, BidResponse, RequestError, SeatBid, decode_request,
                            encode_response, imp_fields, imp_sizes, request_fields, slotprice_from_usd_cpm)


def test_mapping_of_a_2_5_mobile_request(openrtb_examples):
    request = decode_request(openrtb_examples["bid-request-2.5/mobile.json"])
    now = calendar.timegm((2013, 6, 6, 14, 30, 0))  # a Thursday
    shared = request_fields(request, "3", now=now)
    assert shared["weekday"] == 3 and shared["hour"] == 14
    assert shared["useragent"].startswith("Mozilla/5.0 (iPhone")
    assert shared["IP"] == "123.145.167.189"
    assert (shared["region"], shared["city"]) == ("CA", "Los Angeles")
    assert shared["domain"] == "12345"  # app.bundle
    assert shared["adexchange"] == "3" and shared["url"] is None
    first = imp_fields(shared, request.imp[0])
    assert first["slotid"] == "agltb3B1Yi1pbmNyDQsSBFNpdGUY7fD0FAw"
    assert first["slotvisibility"] == "FirstView" and first["slotformat"] == "0"
    assert first["slotprice"] == round(0.5 * USD_TO_CNY * 100)
    assert imp_sizes(request.imp[0]) == [(728, 90)] and imp_sizes(request.imp[1]) == []
    assert imp_fields(shared, request.imp[1])["slotformat"] == "1"  # interstitial


def test_mapping_of_site_user_segments_and_time_offset(openrtb_examples):
    request = decode_request(openrtb_examples["bid-request-2.5/expandable-creative.json"])
    shared = request_fields(request, None, now=calendar.timegm((2013, 6, 6, 20, 0, 0)), utc_offset_hours=8)
    assert shared["weekday"] == 4 and shared["hour"] == 4  # Friday 04:00 in UTC+8
    assert shared["domain"] == "www.foobar.com" and shared["adexchange"] is None
    body = json.loads(openrtb_examples["bid-request-2.5/expandable-creative.json"])
    expected = [s["id"] for d in body["user"]["data"] for s in d.get("segment", []) if "id" in s]
    assert shared["usertag"] == expected and expected


def test_format_list_wins_over_w_h_and_duplicates_go():
    request = decode_request(json.dumps({"id": "r", "imp": [{"id": "1", "banner": {
        "w": 300, "h": 250, "format": [{"w": 728, "h": 90}, {"w": 728, "h": 90}, {"w": 0, "h": 0}]}}]}).encode())
    assert imp_sizes(request.imp[0]) == [(728, 90)]


def test_ipv6_devices_and_unknown_fields():
    request = decode_request(b'{"id": "r", "imp": [{"id": "1", "ext": {"x": 1}}], "device": {"ipv6": "2001:db8::1"},'
                             b' "future_field": [1, 2]}')
    assert request_fields(request, None)["IP"] == "2001:db8::1"


def test_errors_carry_the_path():
    with pytest.raises(RequestError) as info:
        decode_request(b'{"id": "r", "imp": [{"id": "1", "banner": {"format": [{"w": "a"}]}}]}')
    assert info.value.path == "$.imp[0].banner.format[0].w"


def test_floor_conversion_is_explicit():
    # iPinYou slotprice is CNY fen per mille: 1 USD CPM = 7.2 CNY CPM = 720 fen CPM
    assert slotprice_from_usd_cpm(0.0) == 0
    assert slotprice_from_usd_cpm(1.0) == round(USD_TO_CNY * 100) == 720
    assert slotprice_from_usd_cpm(0.015) == 11  # rounded to whole fen
    assert slotprice_from_usd_cpm(1e308) == MAX_SLOTPRICE_FEN  # no overflow on absurd floors


def test_mapping_of_a_2_6_site_request(openrtb_examples):
    request = decode_request(openrtb_examples["bid-request-2.6/simple-banner.json"])
    body = json.loads(openrtb_examples["bid-request-2.6/simple-banner.json"])
    shared = request_fields(request, "2", now=calendar.timegm((2013, 6, 3, 0, 5, 0)))  # a Monday
    assert (shared["weekday"], shared["hour"]) == (0, 0)
    assert shared["domain"] == body["site"]["domain"] and shared["url"] == body["site"]["page"]
    assert shared["useragent"] is None and shared["IP"] is None  # no device object: missing, not an error
    assert shared["usertag"] == [] and shared["adexchange"] == "2"
    record = imp_fields(shared, request.imp[0])
    assert record["slotprice"] == slotprice_from_usd_cpm(body["imp"][0].get("bidfloor", 0.0))
    assert not {"creative", "advertiser", "slotwidth", "slotheight"} & set(record)  # the candidate's fields
    assert imp_sizes(request.imp[0]) == [(body["imp"][0]["banner"]["w"], body["imp"][0]["banner"]["h"])]


def test_video_and_native_imps_have_no_banner_sizes(openrtb_examples):
    for name in ("bid-request-2.5/video.json", "bid-request-2.6/video.json", "bid-request-2.5/native-ad.json"):
        request = decode_request(openrtb_examples[name])
        assert all(imp.banner is None and imp_sizes(imp) == [] for imp in request.imp), name


def test_every_example_decodes(openrtb_examples):
    for name, body in openrtb_examples.items():
        request = decode_request(body)
        assert request.id == json.loads(body)["id"] and request.imp, name


def test_response_encoding_carries_the_win_macro_and_omits_absent_fields():
    bid = Bid(id="r-1", impid="1", price=1.5, adid="cr", crid="cr", adomain=["a.com"], w=300, h=250, mtype=1,
              nurl="https://w/?p=${AUCTION_PRICE}")
    answer = msgspec.json.decode(encode_response(BidResponse(id="r", seatbid=[SeatBid(bid=[bid])])))
    assert answer == {"id": "r", "cur": "USD", "seatbid": [{"seat": "bidder", "bid": [
        {"id": "r-1", "impid": "1", "price": 1.5, "adid": "cr", "crid": "cr", "adomain": ["a.com"], "w": 300,
         "h": 250, "mtype": 1, "nurl": "https://w/?p=${AUCTION_PRICE}"}]}]}


@pytest.mark.parametrize("body,path", [
    (b'{"id": "r", "imp": [{"id": "1"}], "cur": "USD"}', "$.cur"),
    (b'{"id": "r", "imp": [{"id": "1"}], "tmax": -5}', "$.tmax"),
    (b'{"id": "r", "imp": [{"id": "1", "video": []}]}', "$.imp[0].video"),
    (b'{"id": "r", "imp": [{"id": "1"}], "user": {"data": [{"segment": [{"id": 7}]}]}}',
     "$.user.data[0].segment[0].id"),
    (b'{"id": 5, "imp": [{"id": "1"}]}', "$.id"),
])
def test_wrong_types_name_their_path(body, path):
    with pytest.raises(RequestError) as info:
        decode_request(body)
    assert info.value.path == path and info.value.message


def test_request_errors_read_as_their_message():
    error = RequestError("a message", "$.imp")
    assert str(error) == "a message" and error.path == "$.imp"


def test_the_utc_offset_moves_the_clock_by_whole_hours():
    request = decode_request(b'{"id": "r", "imp": [{"id": "1"}]}')
    last_second = calendar.timegm((2013, 6, 6, 19, 59, 59))  # Thursday 19:59:59 UTC
    assert (request_fields(request, None, now=last_second)["hour"]) == 19
    shared = request_fields(request, None, now=last_second, utc_offset_hours=8)
    assert (shared["weekday"], shared["hour"]) == (4, 3)  # Friday 03:59:59, not a second later
    shared = request_fields(request, None, now=last_second + 1, utc_offset_hours=-0.5)
    assert (shared["weekday"], shared["hour"]) == (3, 19)  # 19:30:00


@pytest.mark.parametrize("pos,visibility", [(None, "Na"), (0, "Na"), (1, "FirstView"), (3, "SecondView"),
                                            (5, "OtherView"), (7, "FirstView"), (8, "Na"), (99, "Na")])
def test_ad_positions_map_to_slot_visibility(pos, visibility):
    banner = {"w": 300, "h": 250} if pos is None else {"w": 300, "h": 250, "pos": pos}
    request = decode_request(json.dumps({"id": "r", "imp": [{"id": "1", "banner": banner}]}).encode())
    assert imp_fields(request_fields(request, None), request.imp[0])["slotvisibility"] == visibility


def test_imps_without_a_banner_map_to_records_too():
    request = decode_request(b'{"id": "r", "imp": [{"id": "1", "video": {"w": 640}, "bidfloor": 2, "instl": 1}]}')
    record = imp_fields(request_fields(request, None), request.imp[0])
    assert (record["slotvisibility"], record["slotformat"], record["slotprice"]) == ("Na", "1", 1440)


@pytest.mark.parametrize("banner,sizes", [
    ({"w": 300, "h": 0}, []),
    ({"w": 0, "h": 250}, []),
    ({"w": 300, "h": 250, "format": [{"w": 728, "h": 0}, {"w": 0, "h": 90}]}, [(300, 250)]),
    ({"format": [{"w": 728, "h": 0}]}, []),
    ({"format": [{"w": 728, "h": 90}, {"w": 300, "h": 250}, {"w": 728, "h": 90}]}, [(728, 90), (300, 250)]),
])
def test_a_size_needs_both_sides(banner, sizes):
    request = decode_request(json.dumps({"id": "r", "imp": [{"id": "1", "banner": banner}]}).encode())
    assert imp_sizes(request.imp[0]) == sizes


def test_the_slot_price_feature_reads_the_usd_floor_at_the_tables_yuan_rate():
    request = decode_request(b'{"id": "r", "imp": [{"id": "1", "bidfloor": 2.0, "bidfloorcur": "EUR"}]}')
    shared = request_fields(request, None)
    assert imp_fields(shared, request.imp[0])["slotprice"] == slotprice_from_usd_cpm(2.0)
    assert imp_fields(shared, request.imp[0], 2.5)["slotprice"] == slotprice_from_usd_cpm(2.5)  # converted floor
    assert imp_fields(shared, request.imp[0], 2.5, 8.0)["slotprice"] == slotprice_from_usd_cpm(2.5, 8.0) == 2000


CATALOG_SIZES = [(300, 250), (728, 90), (1000, 90), (160, 600), (250, 250), (200, 200), (336, 280), (300, 600)]


@pytest.mark.parametrize("banner,sizes", [
    ({"wmin": 700, "wmax": 800, "hmin": 80, "hmax": 100}, [(728, 90)]),  # both sides in range, not either
    ({"wmin": 728, "wmax": 728, "hmin": 90, "hmax": 90}, [(728, 90)]),   # the bounds are inclusive
    ({"wmin": 300}, [(300, 250), (300, 600), (336, 280), (728, 90), (1000, 90)]),  # no upper bound, no height
    ({"hmin": 250, "hmax": 280}, [(250, 250), (300, 250), (336, 280)]),
    ({"wmax": 250, "hmax": 250}, [(200, 200), (250, 250)]),
    ({"wmax": 250}, [(160, 600), (200, 200), (250, 250)]),                  # one bound is a range too
    ({"w": 300, "h": 250, "format": [{"wratio": 2}]}, [(300, 250)]),        # a ratio needs both sides
])
def test_a_banner_range_accepts_the_catalogs_sizes_within_it(banner, sizes):
    request = decode_request(json.dumps({"id": "r", "imp": [{"id": "1", "banner": banner}]}).encode())
    assert imp_sizes(request.imp[0], CATALOG_SIZES) == sizes


@given(st.floats(-2e9, 4e9, allow_nan=False), st.sampled_from([0, 8, -5, 5.5, -9.5, 14, -12]))
def test_weekday_and_hour_equal_gmtime_at_any_instant_and_offset(now, offset):
    import time

    request = decode_request(b'{"id": "1", "imp": [{"id": "1"}]}')
    shared = request_fields(request, None, now=now, utc_offset_hours=offset)
    stamp = time.gmtime(now + offset * 3600)
    assert (shared["weekday"], shared["hour"]) == (stamp.tm_wday, stamp.tm_hour)


@pytest.mark.parametrize("body,message,path", [
    (b'{"id": "r", "imp": [{"id": "1"}], "site": {"domain": "a\xffb"}}',
     "byte 0xff at offset 55 in the string at $.site.domain", "$.site.domain"),
    (b'{"id": "r", "imp": [{"id": "1", "tagid": "\x80"}]}', "byte 0x80 at offset 42 in the string at $.imp[0].tagid",
     "$.imp[0].tagid"),
    (b'{"id": "r\xff', "byte 0xff at offset 9", "$"),  # not JSON either: no path to name
])
def test_bytes_that_are_not_utf8_are_named_by_offset_and_path(body, message, path):
    with pytest.raises(RequestError) as info:
        decode_request(body)
    assert (info.value.message, info.value.path) == ("request body is not valid UTF-8: " + message, path)


@pytest.mark.parametrize("body,message,path", [
    (b'{"records": [{"dom\x80": 1}]}', "byte 0x80 at offset 18 in a key of the object at $.records[0]",
     "$.records[0]"),
    (b'{"rec\xffords": []}', "byte 0xff at offset 5 in a key of the object at $", "$"),
])
def test_bytes_that_are_not_utf8_in_a_key_name_the_object(body, message, path):
    with pytest.raises(RequestError) as info:
        decode_predict(body)
    assert (info.value.message, info.value.path) == ("request body is not valid UTF-8: " + message, path)


def test_an_empty_imp_list_says_so():
    with pytest.raises(RequestError) as info:
        decode_request(b'{"id": "r", "imp": []}')
    assert (info.value.message, info.value.path) == ("a bid request needs at least one imp", "$.imp")


def test_predict_fields_out_of_range_get_plain_words_and_wrong_types_keep_the_detail():
    words = "expected a weekday 0-6 (Monday = 0), a number or a string of digits"
    with pytest.raises(RequestError) as info:
        decode_predict(b'{"records": [{"weekday": 9}]}')
    assert (info.value.message, info.value.path) == (words, "$.records[0].weekday")
    with pytest.raises(RequestError) as info:
        decode_predict(b'{"records": [{"weekday": [1]}]}')
    assert info.value.message.startswith(words + ": Expected ") and "array" in info.value.message


@given(st.floats(min_value=-2e9, max_value=4e10, allow_nan=False))
def test_weekday_and_hour_are_gmtimes(seconds):
    import time

    stamp = time.gmtime(seconds)
    assert weekday_hour(seconds) == (stamp.tm_wday, stamp.tm_hour)
