"""Load benchmark of the bid server against the framework ceiling (`python -m bench load`).

`bench.echo` is the ceiling: the bidder's HTTP stack and JSON decoder with no work behind them.
`bench.baseline` is the day-one implementation: the same bid on FastAPI + uvicorn, written plainly.
`bench.load` starts the servers, drives them with wrk, scrapes the bidder's batch metrics
(`bench.scrape`) and hands the figures to `bench.report`.
"""
