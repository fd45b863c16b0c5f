"""Produces CloudEvents to Kafka as a third party would: the official
CloudEvents Python SDK (PyPI `cloudevents`) encodes them, confluent-kafka
sends them. Used by tests/cloudevents_kafka.rs.

stdin, one JSON document:
  {"brokers": "...", "topic": "...", "events": [{
      "api": "core" | "v1",   # cloudevents.core.bindings.kafka, or cloudevents.v1.kafka
                              # (the 1.x SDK's `cloudevents.kafka`)
      "mode": "binary" | "structured",
      "attributes": {...},    # `partitionkey` becomes the record key
      "data": {...} | null,
      "data_as_bytes": false, # data as the bytes of its JSON (structured: `data_base64`)
      "drop_headers": [],     # headers removed after encoding (a producer leaving them out)
      "timestamp_ms": null    # the record's CreateTime (else the producer's clock)
  }]}
stdout: one JSON line per record as sent: {"key", "value_base64", "headers": [[name, value]]}.
"""

import base64
import json
import sys

from confluent_kafka import Producer


def encode(spec):
    data = spec.get("data")
    if data is not None and spec.get("data_as_bytes"):
        data = json.dumps(data).encode("utf-8")
    attributes = dict(spec["attributes"])
    if spec["api"] == "core":
        from cloudevents.core.bindings import kafka
        from cloudevents.core.formats.json import JSONFormat
        from cloudevents.core.v1.event import CloudEvent

        event = CloudEvent(attributes=attributes, data=data)
        convert = kafka.to_binary if spec["mode"] == "binary" else kafka.to_structured
        message = convert(event, JSONFormat())
    else:
        from cloudevents.v1 import kafka
        from cloudevents.v1.http import CloudEvent

        event = CloudEvent(attributes, data)
        convert = kafka.to_binary if spec["mode"] == "binary" else kafka.to_structured
        message = convert(event)
    headers = {k: v for k, v in message.headers.items() if k not in spec.get("drop_headers", [])}
    key = message.key.encode("utf-8") if isinstance(message.key, str) else message.key
    value = message.value.encode("utf-8") if isinstance(message.value, str) else message.value
    return key, value, headers


def main():
    request = json.load(sys.stdin)
    producer = Producer({"bootstrap.servers": request["brokers"], "enable.idempotence": True})
    failures = []

    def delivered(err, _msg):
        if err is not None:
            failures.append(str(err))

    sent = []
    for spec in request["events"]:
        key, value, headers = encode(spec)
        extra = {}
        if spec.get("timestamp_ms") is not None:
            extra["timestamp"] = spec["timestamp_ms"]
        producer.produce(
            request["topic"],
            value=value,
            key=key,
            headers=list(headers.items()),
            on_delivery=delivered,
            **extra,
        )
        sent.append(
            {
                "key": key.decode("utf-8") if key is not None else None,
                "value_base64": base64.b64encode(value or b"").decode("ascii"),
                "headers": [[k, v.decode("utf-8")] for k, v in headers.items()],
            }
        )
    left = producer.flush(30)
    if left or failures:
        sys.exit(f"not delivered: {left} left, errors {failures}")
    for s in sent:
        print(json.dumps(s))


if __name__ == "__main__":
    main()
