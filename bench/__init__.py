"""Load benchmark of the bid server against the framework ceiling (`python -m bench load`).

`bench.echo` is the ceiling: the bidder's HTTP stack and JSON decoder with no work behind them.
`bench.load` starts both servers, drives them with wrk and hands the figures to `bench.report`.
"""
