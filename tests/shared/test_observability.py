import json
import logging
import sys

from shared.observability import JsonFormatter


class TestJsonLogs:
    def test_one_json_object_per_line_with_extras(self) -> None:
        record = logging.LogRecord("shared.consumer", logging.WARNING, __file__, 1, "dead-lettered %s", ("x",), None)
        record.__dict__["topic"] = "loyalty.purchases.v1"
        line = JsonFormatter("rules").format(record)
        doc = json.loads(line)
        assert doc["level"] == "warning"
        assert doc["service"] == "rules"
        assert doc["msg"] == "dead-lettered x"
        assert doc["topic"] == "loyalty.purchases.v1"
        assert doc["ts"].endswith("+00:00"), "log times are UTC"
        assert "\n" not in line

    def test_exceptions_are_kept(self) -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
        doc = json.loads(JsonFormatter("ledger").format(record))
        assert "ValueError: boom" in doc["exc"]
