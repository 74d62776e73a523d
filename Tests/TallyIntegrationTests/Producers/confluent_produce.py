"""Publishes records with Python's confluent-kafka, as a team's own producer would.

Usage: confluent_produce.py BROKERS TOPIC PARTITIONER RECORDS.jsonl
Each line of RECORDS.jsonl is {"key": str, "value": str, "headers": {name: str}}; each line printed is "delivery " and
{"key": str, "partition": int, "offset": int} or {"key": str, "error": str}, in input order.
PARTITIONER is a librdkafka partitioner: murmur2_random is the Java client's, consistent_random
librdkafka's historical default.
"""
import json
import sys

from confluent_kafka import Producer


def main() -> None:
    brokers, topic, partitioner, path = sys.argv[1:5]
    producer = Producer({
        "bootstrap.servers": brokers,
        "partitioner": partitioner,
        "enable.idempotence": True,
        "acks": "all",
    })
    with open(path, encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    results = [None] * len(records)

    def delivered(index):
        def report(error, message):
            key = records[index]["key"]
            results[index] = {"key": key, "error": str(error)} if error else \
                {"key": key, "partition": message.partition(), "offset": message.offset()}
        return report

    for index, record in enumerate(records):
        headers = [(name, value.encode()) for name, value in record.get("headers", {}).items()]
        producer.produce(topic, key=record["key"].encode(), value=record["value"].encode(),
                         headers=headers, on_delivery=delivered(index))
        producer.poll(0)
    producer.flush(30)
    for result in results:
        print("delivery " + json.dumps(result if result else {"error": "no delivery report"}))


if __name__ == "__main__":
    main()
