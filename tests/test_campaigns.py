"""The campaign catalog: validation with errors that name the entry, targeting, the default catalog."""
from __future__ import annotations

import json
import re

import pytest

from bidder.app import DEFAULT_CAMPAIGNS
from bidder.campaigns import AUCTION_PRICE_MACRO, Catalog, CatalogError, decode_catalog, load_catalog
from catalogs import parse_catalog


def _creative(**fields):
    return dict({"id": "cr", "w": 300, "h": 250, "adomain": ["a.com"], "nurl": "https://w/${AUCTION_PRICE}"},
                **fields)


def _catalog(**creative):
    return {"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1.0, "creatives": [_creative(**creative)]}]}


def test_default_catalog_matches_the_synthetic_advertisers():
    from train.data.synthetic import ADVERTISERS

    catalog = load_catalog(DEFAULT_CAMPAIGNS)
    served = {(c.advertiser, c.creative_id, c.w, c.h) for c in catalog.candidates}
    trained = {(adv, c["id"], c["w"], c["h"]) for adv, creatives in ADVERTISERS.items() for c in creatives}
    assert served == trained
    assert {c.advertiser for c in catalog.candidates} == {1458, 2259, 2261, 2821, 2997, 3358, 3386, 3427, 3476}
    assert len(catalog.for_size(300, 250)) == 9
    assert all(AUCTION_PRICE_MACRO in c.nurl and c.adomain for c in catalog.candidates)
    assert not catalog.targeted


def test_candidate_layers_hold_the_candidate_fields_only():
    (candidate,) = parse_catalog(_catalog(w=728, h=90)).candidates
    assert candidate.layer == {"creative": "cr", "advertiser": 1, "slotwidth": 728, "slotheight": 90}


@pytest.mark.parametrize("data,message", [
    ([], "expected an object with a 'campaigns' list"),
    ({"campaigns": {}}, "expected an object with a 'campaigns' list"),
    ({"campaigns": [], "extra": 1}, r"unknown keys \['extra'\]"),
    ({"campaigns": [7]}, r"campaigns\[0\]: expected an object"),
    (_catalog(nurl="https://w/no-macro"), r"campaigns\[0\].creatives\[0\].nurl: must carry"),
    (_catalog(nurl=None), r"campaigns\[0\].creatives\[0\]: needs a nurl .* or markup"),
    (_catalog(markup=5), r"campaigns\[0\].creatives\[0\].markup: expected a non-empty string"),
    (_catalog(w=0), r"campaigns\[0\].creatives\[0\]: w and h must be positive integers, got 0 x 250$"),
    (_catalog(h=True), r"campaigns\[0\].creatives\[0\]: w and h must be positive integers, got 300 x True$"),
    (_catalog(adomain=[]), r"campaigns\[0\].creatives\[0\].adomain"),
    (_catalog(id=""), r"campaigns\[0\].creatives\[0\].id: expected a non-empty string"),
    (_catalog(colour="red"), r"campaigns\[0\].creatives\[0\]: unknown keys \['colour'\]"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 0, "creatives": []}]}, "value_per_click"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": True, "creatives": []}]}, "value_per_click"),
    ({"campaigns": [{"id": "c", "advertiser": "x", "value_per_click": 1, "creatives": []}]}, "advertiser"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "creatives": []}]}, r"creatives: expected a non-empty"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "enabeld": False,
                     "creatives": [_creative()]}]}, r"campaigns\[0\]: unknown keys \['enabeld'\]"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "enabled": "no",
                     "creatives": [_creative()]}]}, r"campaigns\[0\].enabled: expected true or false"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "targeting": {"sizes": [[300]]},
                     "creatives": [_creative()]}]}, r"targeting.sizes: expected a list of \[w, h\] pairs"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "targeting": {"domains": "a.com"},
                     "creatives": [_creative()]}]}, r"targeting.domains: expected a list of strings"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "targeting": {"geo": ["CN"]},
                     "creatives": [_creative()]}]}, r"targeting: unknown keys \['geo'\]"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "creatives": [_creative()]},
                    {"id": "c", "advertiser": 2, "value_per_click": 1, "creatives": [_creative(id="x")]}]},
     r"campaigns\[1\].id: duplicate campaign id 'c'"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "creatives": [_creative()]},
                    {"id": "d", "advertiser": 2, "value_per_click": 1, "creatives": [_creative()]}]},
     r"campaigns\[1\].creatives\[0\].id: creative 'cr' is also in campaigns\[0\].creatives\[0\]"),
    ({"campaigns": [{"advertiser": 1, "value_per_click": 1, "creatives": [_creative()]}]},
     r"^catalog: campaigns\[0\]\.id: expected a non-empty string, got None$"),
    ({"campaigns": [{"id": "c", "advertiser": -1, "value_per_click": 1, "creatives": [_creative()]}]},
     r"^catalog: campaigns\[0\]\.advertiser: expected a non-negative integer, got -1$"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1e6, "creatives": [_creative()]}]},
     r"^catalog: campaigns\[0\]\.value_per_click: expected a positive number of USD, got 1000000.0$"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "targeting": ["x"],
                     "creatives": [_creative()]}]}, r"^catalog: campaigns\[0\]\.targeting: expected an object$"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "targeting": {"exchanges": "2"},
                     "creatives": [_creative()]}]},
     r"^catalog: campaigns\[0\]\.targeting\.exchanges: expected a list of strings$"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "creatives": [7]}]},
     r"^catalog: campaigns\[0\]\.creatives\[0\]: expected an object$"),
    (_catalog(nurl=5), r"^catalog: campaigns\[0\]\.creatives\[0\]\.nurl: expected a non-empty string, got 5$"),
    (_catalog(adomain=[5]), r"^catalog: campaigns\[0\]\.creatives\[0\]\.adomain: expected a non-empty list"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "deals": [5], "creatives": [_creative()]}]},
     r"^catalog: campaigns\[0\]\.deals\[0\]: expected an object$"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "deals": [{"dealid": "d", "price": 2}],
                     "creatives": [_creative()]}]}, r"^catalog: campaigns\[0\]\.deals\[0\]: unknown keys \['price'\]"),
])
def test_catalog_errors_name_the_entry(data, message):
    with pytest.raises(CatalogError, match=message):
        parse_catalog(data)


def test_a_file_catalog_names_its_file_in_errors_and_as_its_source(tmp_path):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"campaigns": [{"id": "c", "advertiser": "x", "value_per_click": 1,
                                               "creatives": [_creative()]}]}))
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(info.value).startswith(f"{path}: campaigns[0].advertiser: ")
    path.write_text(json.dumps(_catalog()))
    assert load_catalog(path).source == str(path)
    assert parse_catalog(_catalog()).source == "catalog" and Catalog([]).source == "catalog"


def test_sizes_without_creatives_have_no_candidates_and_1x1_is_a_size():
    catalog = parse_catalog(_catalog(w=1, h=1))
    assert [c.creative_id for c in catalog.for_size(1, 1)] == ["cr"]
    assert catalog.for_size(300, 250) == () and catalog.eligible(300, 250, None, None, frozenset()) == ()


def test_catalog_files_that_cannot_be_read(tmp_path):
    with pytest.raises(CatalogError, match="no such file"):
        load_catalog(tmp_path / "missing.json")
    path = tmp_path / "catalog.json"
    path.write_text("{")
    with pytest.raises(CatalogError, match=r"catalog.json: invalid JSON at line 1"):
        load_catalog(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(path)


def test_markup_only_creatives_are_candidates():
    (candidate,) = parse_catalog(_catalog(nurl=None, markup="<img src='x'>")).candidates
    assert candidate.nurl is None and candidate.markup == "<img src='x'>"


def test_targeting_disabled_campaigns_and_size_filters(tmp_path):
    data = _catalog()
    data["campaigns"][0]["targeting"] = {"domains": ["news.com"], "exchanges": ["2"]}
    data["campaigns"].append({"id": "off", "advertiser": 2, "value_per_click": 1.0, "enabled": False,
                              "creatives": [_creative(id="cr-off")]})
    data["campaigns"].append({"id": "sized", "advertiser": 3, "value_per_click": 1.0,
                              "targeting": {"sizes": [[728, 90]]},
                              "creatives": [_creative(id="cr-300"), _creative(id="cr-728", w=728, h=90)]})
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(data))
    catalog = load_catalog(path)
    assert sorted(c.creative_id for c in catalog.candidates) == ["cr", "cr-728"]
    assert catalog.targeted and catalog.sizes == {(300, 250), (728, 90)}
    (candidate,) = catalog.for_size(300, 250)
    assert candidate.runs_on("news.com", "2", frozenset())
    assert not candidate.runs_on("other.com", "2", frozenset())
    assert not candidate.runs_on("news.com", "1", frozenset())
    assert not candidate.runs_on("news.com", "2", frozenset({"a.com"}))
    assert catalog.eligible(300, 250, "news.com", "2", frozenset()) == (candidate,)
    assert catalog.eligible(300, 250, "news.com", None, frozenset()) == ()
    assert catalog.eligible(728, 90, None, None, frozenset())[0].creative_id == "cr-728"
    assert catalog.eligible(1, 1, "news.com", "2", frozenset()) == ()


def test_untargeted_catalogs_still_honour_blocked_advertisers():
    catalog = parse_catalog({"campaigns": [
        {"id": "a", "advertiser": 1, "value_per_click": 1, "creatives": [_creative(id="x", adomain=["a.com"])]},
        {"id": "b", "advertiser": 2, "value_per_click": 1, "creatives": [_creative(id="y", adomain=["b.com"])]}]})
    assert not catalog.targeted
    assert len(catalog.eligible(300, 250, None, None, frozenset())) == 2
    assert [c.creative_id for c in catalog.eligible(300, 250, None, None, frozenset({"a.com"}))] == ["y"]
    # answered again from what the same list left (a publisher's list comes back), and per size
    assert [c.creative_id for c in catalog.eligible(300, 250, None, None, frozenset({"a.com"}))] == ["y"]
    assert catalog.eligible(300, 250, None, None, frozenset({"b.com", "a.com"})) == ()
    assert catalog.eligible(728, 90, None, None, frozenset({"a.com"})) == ()
    # a list naming none of a size's advertisers leaves that size's candidates as they are
    every = catalog.eligible(300, 250, None, None, frozenset())
    assert catalog.eligible(300, 250, None, None, frozenset({"c.com", "b.co"})) is every


def test_a_catalog_of_some_candidates_numbers_them_afresh():
    """Scoring addresses a candidate by its index in the catalog: a catalog built from a subset renumbers."""
    data = {"campaigns": [{"id": f"c{i}", "advertiser": i, "value_per_click": 1.0,
                           "creatives": [_creative(id=f"cr{i}")]} for i in range(4)]}
    every = parse_catalog(data).candidates
    assert [c.index for c in every] == [0, 1, 2, 3]
    some = Catalog(every[2:] + every[:1])
    assert [c.index for c in some.candidates] == [0, 1, 2]
    assert [c.creative_id for c in some.candidates] == ["cr2", "cr3", "cr0"]
    assert some.candidates[0].value_per_click == 1.0 and some.candidates[0].layer == every[2].layer


_FIRST = {"id": "c", "advertiser": 1, "value_per_click": 1.5, "name": "ünï",
          "creatives": [_creative(markup='<a href="x">]}</a>')]}
_SECOND = {"id": "d", "advertiser": 2, "value_per_click": 2, "targeting": {"sizes": [[300, 250]]},
           "deals": [{"dealid": "D1"}], "creatives": [_creative(id="cr2", nurl=None, markup="{[")]}


@pytest.mark.parametrize("text", [
    ' \n{ "campaigns" :\t[ FIRST , SECOND\r\n] }\n ',
    '{"campaigns": [FIRST, SECOND]}',
    '{"campaigns": [SECOND], "campaigns": [FIRST, SECOND]}',     # a repeated key: the last one, as json.loads
])
def test_a_catalog_file_reads_as_json_loads_reads_it(tmp_path, text):
    """A file's campaigns are decoded one per call (a reload's thread can hand the GIL over between them),
    whatever the layout around them and whatever brackets their strings hold."""
    text = text.replace("FIRST", json.dumps(_FIRST)).replace("SECOND", json.dumps(_SECOND))
    path = tmp_path / "catalog.json"
    path.write_text(text, encoding="utf-8")
    catalog = load_catalog(path)
    expected = [(campaign["id"], creative["id"], float(campaign["value_per_click"]), creative.get("nurl"),
                 creative.get("markup"), tuple(creative["adomain"]))
                for campaign in json.loads(text)["campaigns"] for creative in campaign["creatives"]]
    assert [(c.campaign_id, c.creative_id, c.value_per_click, c.nurl, c.markup, c.adomain)
            for c in catalog.candidates] == expected
    assert catalog.candidates[0].layer["creative"] == "cr" and catalog.candidates[1].deals[0].dealid == "D1"


@pytest.mark.parametrize("text,message", [
    ('{"campaigns": [FIRST, {"id": "x", "advertiser": -1}]}',
     r"campaigns\[1\]\.advertiser: expected a non-negative integer, got -1$"),
    ('{"campaigns": [FIRST, SECOND, {"id": "c"}]}', r"campaigns\[2\]\.advertiser: .*, got None$"),
    ('{"campaigns": [SECOND, SECOND]}', r"campaigns\[1\]\.id: duplicate campaign id 'd'$"),
    ('{"campaigns": [FIRST, {"id": "d", "advertiser": 2, "value_per_click": 1, "creatives": [{"w": 300}]}]}',
     r"campaigns\[1\]\.creatives\[0\]\.id: expected a non-empty string, got None$"),
    ('{"campaigns": [FIRST], "extra": {"a": [1]}}', r"unknown keys \['extra'\] \(allowed: \['campaigns'\]\)$"),
])
def test_a_file_names_the_campaign_in_its_errors(tmp_path, text, message):
    text = text.replace("FIRST", json.dumps(_FIRST)).replace("SECOND", json.dumps(_SECOND))
    path = tmp_path / "catalog.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CatalogError, match=f"^{re.escape(str(path))}: {message}"):
        load_catalog(path)


def test_a_catalog_file_is_decoded_one_campaign_per_call(monkeypatch, tmp_path):
    from bidder import campaigns

    decoded = []
    real = campaigns._campaign_decoder

    class Spy:
        def decode(self, raw):
            decoded.append(json.loads(bytes(raw)))
            return real.decode(raw)

    monkeypatch.setattr(campaigns, "_campaign_decoder", Spy())
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"campaigns": [_FIRST, _SECOND]}, indent=1))
    assert len(load_catalog(path)) == 2
    assert decoded == [_FIRST, _SECOND]
    path.write_text('{"campaigns": []}')
    assert len(load_catalog(path)) == 0 and len(decoded) == 2


@pytest.mark.parametrize("text", [
    '{"campaigns": [{"a": 1},]}',
    '{"campaigns": [{"a": 1} {"b": 2}]}',
    '{"campaigns": [{"a": 1}]',
    '{"campaigns": [{"a": 1}]} x',
    '{"campaigns": [{"a": 1}]}\u00a0',                        # not JSON whitespace
    '{"campaigns":\u00a0[{"a": 1}]}',
    '{"campaigns": [\n{"a": 1},\n\u00e9]}',
    '{"campaigns": [7]}\n\n  x',                              # not JSON: so told, before the schema error
    '[1, 2',
    '',
])
def test_a_file_that_is_not_json_names_the_line_and_column(tmp_path, text):
    path = tmp_path / "catalog.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(text)
    with pytest.raises(CatalogError) as raised:
        load_catalog(path)
    found = re.fullmatch(rf"{re.escape(str(path))}: invalid JSON at line (\d+) column (\d+): .+", str(raised.value))
    assert found, raised.value
    line, column = int(found[1]), int(found[2])
    # the place json.loads names, or just past it (msgspec names the offending character's end)
    assert line == reference.value.lineno and 0 <= column - reference.value.colno <= 2, (raised.value, reference.value)


@pytest.mark.parametrize("text,message", [
    ('{"campaigns": [{"a": 1},]}', "line 1 column 25: trailing comma in array"),
    ('{"campaigns": [\n{"a": 1},\n\u00e9]}', "line 3 column 1: invalid character"),
    ('{"campaigns": [\n  7,\n  "\u00e9\u00e9" x]}', "line 3 column 8: expected ',' or ']'"),  # columns count characters
    ('{"campaigns": [7, 8 9]}', "line 1 column 21: expected ',' or ']'"),  # not JSON, and 7 no campaign either
    ('[1, 2', "line 1 column 6: Input data was truncated"),
])
def test_a_syntax_error_names_the_offending_character_in_plain_words(text, message):
    """The column of the character the decoder stopped at, and its words without the decoder's byte offset."""
    with pytest.raises(CatalogError) as raised:
        decode_catalog(text, "cat.json")
    assert str(raised.value) == f"cat.json: invalid JSON at {message}"


def test_an_indented_catalog_file_loads_as_a_compact_one(tmp_path):
    path = tmp_path / "campaigns.json"
    path.write_text(json.dumps(json.loads(DEFAULT_CAMPAIGNS.read_text()), indent=1))
    indented = load_catalog(path)
    assert indented.candidates == load_catalog(DEFAULT_CAMPAIGNS).candidates and len(indented) > 0
    path.write_text(path.read_text()[:-3])
    with pytest.raises(CatalogError, match=r"campaigns.json: invalid JSON at line \d+ column \d+"):
        load_catalog(path)


# -- campaign money terms -------------------------------------------------------------------------------------
def _termed(**terms):
    data = _catalog()
    data["campaigns"][0].update(terms)
    return data


def test_money_terms_are_read_per_campaign():
    catalog = parse_catalog(_termed(
        budget={"daily": 250.0, "total": 5000.0, "timezone": "America/New_York"}, pacing="even", max_cpm=20.0,
        flight={"start": "2026-12-01T00:00:00-05:00", "end": "2026-12-31T00:00:00Z"},
        frequency_cap=[{"count": 3, "seconds": 86400}, {"count": 1, "seconds": 60, "scope": "creative"}]))
    terms = catalog.terms["c"]
    assert (terms.total_usd, terms.daily_usd, str(terms.timezone)) == (5000.0, 250.0, "America/New_York")
    assert (terms.pacing, terms.max_cpm, terms.budgeted) == ("even", 20.0, True)
    assert terms.start == 1796101200.0 and terms.end == 1798675200.0  # 05:00 UTC; midnight UTC
    assert terms.in_flight(terms.start) and not terms.in_flight(terms.start - 1) and not terms.in_flight(terms.end)
    assert [(c.count, c.seconds, c.scope) for c in terms.frequency_caps] == [(3, 86400, "campaign"),
                                                                         (1, 60, "creative")]


def test_campaigns_without_money_terms_have_none_and_a_bare_budget_is_asap_in_utc():
    assert parse_catalog(_catalog()).terms == {}
    terms = parse_catalog(_termed(budget={"total": 10})).terms["c"]
    assert (terms.total_usd, terms.daily_usd, str(terms.timezone), terms.pacing) == (10.0, None, "UTC", "asap")
    assert terms.in_flight(0.0) and terms.max_cpm is None and terms.frequency_caps == ()
    capped = parse_catalog(_termed(max_cpm=2.5)).terms["c"]
    assert not capped.budgeted and capped.max_cpm == 2.5


@pytest.mark.parametrize("terms,message", [
    ({"budget": 5}, r"^catalog: campaigns\[0\]\.budget: expected an object"),
    ({"budget": {}}, r"^catalog: campaigns\[0\]\.budget: needs a total or a daily amount"),
    ({"budget": {"daily": -1}}, r"^catalog: campaigns\[0\]\.budget\.daily: expected a positive number of USD"),
    ({"budget": {"total": "lots"}}, r"^catalog: campaigns\[0\]\.budget\.total: expected a positive number"),
    ({"budget": {"daily": 1, "timezone": "Mars/Base"}},
     r"^catalog: campaigns\[0\]\.budget\.timezone: unknown time zone 'Mars/Base'"),
    ({"budget": {"daily": 1, "timezone": "../etc/passwd"}}, r"budget\.timezone: unknown time zone"),
    ({"budget": {"daily": 1, "tz": "UTC"}}, r"^catalog: campaigns\[0\]\.budget: unknown keys \['tz'\]"),
    ({"flight": {"start": "yesterday"}}, r"^catalog: campaigns\[0\]\.flight\.start: expected an ISO 8601 time"),
    ({"flight": {"end": 5}}, r"^catalog: campaigns\[0\]\.flight\.end: expected an ISO 8601 time"),
    ({"flight": {"start": "2026-12-02T00:00:00Z", "end": "2026-12-01T00:00:00Z"}},
     r"^catalog: campaigns\[0\]\.flight: ends \(2026-12-01T00:00:00Z\) before it starts"),
    ({"pacing": "fast"}, r"^catalog: campaigns\[0\]\.pacing: expected 'even' or 'asap', got 'fast'$"),
    ({"pacing": "even", "budget": {"total": 5}}, r"^catalog: campaigns\[0\]\.pacing: 'even' .* set budget\.daily"),
    ({"max_cpm": 0}, r"^catalog: campaigns\[0\]\.max_cpm: expected a positive bid price"),
    ({"frequency_cap": {}}, r"^catalog: campaigns\[0\]\.frequency_cap: expected a list of"),
    ({"frequency_cap": [{"count": 0, "seconds": 1}]},
     r"^catalog: campaigns\[0\]\.frequency_cap\[0\]\.count: expected a positive integer of impressions, got 0$"),
    ({"frequency_cap": [{"count": 1}]}, r"^catalog: campaigns\[0\]\.frequency_cap\[0\]\.seconds: .* got None$"),
    ({"frequency_cap": [{"count": 1, "seconds": 60, "scope": "user"}]},
     r"^catalog: campaigns\[0\]\.frequency_cap\[0\]\.scope: expected 'campaign' or 'creative', got 'user'$"),
    ({"frequency_cap": [{"count": 1, "seconds": 60, "per": "day"}]},
     r"^catalog: campaigns\[0\]\.frequency_cap\[0\]: unknown keys \['per'\]"),
])
def test_money_term_errors_name_the_entry(terms, message):
    with pytest.raises(CatalogError, match=message):
        parse_catalog(_termed(**terms))


# -- deal buyers (retrieval adds them to an imp's top K) ----------------------------------------------------------
def test_a_deals_buyers_are_its_campaigns_creatives_that_may_run_here():
    def campaign(name, deals, **targeting):
        return {"id": name, "advertiser": 1, "value_per_click": 1.0, "deals": [{"dealid": d} for d in deals],
                **({"targeting": targeting} if targeting else {}),
                "creatives": [_creative(id=f"{name}-300", adomain=[f"{name}.example"]),
                              _creative(id=f"{name}-728", w=728, h=90, adomain=[f"{name}.example"])]}

    catalog = parse_catalog({"campaigns": [
        campaign("anywhere", ["D-1", "D-2"]), campaign("news", ["D-1"], domains=["news.example"]),
        campaign("exchange-2", ["D-2"], exchanges=["2"]), campaign("no-deal", [])]})

    def buyers(dealids, domain="news.example", exchange="2", blocked=frozenset(), size=(300, 250)):
        return [c.creative_id for c in catalog.deal_buyers(*size, dealids, domain, exchange, blocked)]

    assert buyers(["D-1", "D-2"]) == ["anywhere-300", "news-300", "exchange-2-300"]  # each buyer once
    assert buyers(["D-2", "D-1"]) == ["anywhere-300", "exchange-2-300", "news-300"]
    assert buyers(["D-1"], size=(728, 90)) == ["anywhere-728", "news-728"]
    assert buyers(["D-1", "D-2"], domain="other.example", exchange="1") == ["anywhere-300"]  # targeting applies
    assert buyers(["D-1"], blocked=frozenset({"anywhere.example"})) == ["news-300"]            # badv applies
    assert buyers(["D-unknown"]) == [] and buyers(["D-1"], size=(160, 600)) == []
