#!/usr/bin/env python3
"""An independent reader for graphdelta's Kafka topics (Python confluent-kafka,
not rust-rdkafka): reads a topic from the beginning to the end of every
partition and prints one JSON summary on stdout.

    read_topic.py --brokers 127.0.0.1:9092 --topic graphdelta.contoso.users \
        [--isolation read_committed] [--timeout 30]

The summary: {"records": n, "events": n, "tombstones": n,
"keys": {key: records}, "ce_types": {type: n}, "content_types": {...},
"ce_ids": [...], "subjects_match_keys": bool, "partitions": {p: n}}.
Exit status 2 when the end of the topic is not reached within the timeout.
The protobuf values are not decoded here (no generated Python classes); the
Rust tests decode them.
"""

import argparse
import collections
import json
import sys
import time

from confluent_kafka import Consumer, KafkaError, TopicPartition


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--isolation", default="read_uncommitted",
                    choices=["read_uncommitted", "read_committed"])
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()

    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": f"graphdelta-python-reader-{time.time_ns()}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "isolation.level": args.isolation,
        "fetch.wait.max.ms": 10,
    })
    metadata = consumer.list_topics(args.topic, timeout=10)
    topic = metadata.topics.get(args.topic)
    if topic is None or topic.error is not None or not topic.partitions:
        print(json.dumps({"error": f"topic {args.topic} not found"}))
        return 2
    partitions = sorted(topic.partitions)
    consumer.assign([TopicPartition(args.topic, p, 0) for p in partitions])

    summary = {
        "records": 0, "events": 0, "tombstones": 0,
        "keys": collections.Counter(), "ce_types": collections.Counter(),
        "content_types": collections.Counter(), "ce_ids": [],
        "subjects_match_keys": True, "partitions": collections.Counter(),
    }
    done = set()
    deadline = time.monotonic() + args.timeout
    while len(done) < len(partitions):
        if time.monotonic() > deadline:
            print(json.dumps({"error": "timeout", "partitions_done": sorted(done)}))
            return 2
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                done.add(msg.partition())
                continue
            print(json.dumps({"error": str(msg.error())}))
            return 1
        key = msg.key().decode() if msg.key() is not None else None
        headers = {k: (v.decode() if v is not None else None)
                   for k, v in (msg.headers() or [])}
        summary["records"] += 1
        summary["partitions"][str(msg.partition())] += 1
        summary["keys"][key] += 1
        if msg.value() is None:
            summary["tombstones"] += 1
            continue
        summary["events"] += 1
        summary["ce_types"][headers.get("ce_type")] += 1
        summary["content_types"][headers.get("content-type")] += 1
        summary["ce_ids"].append(headers.get("ce_id"))
        if headers.get("ce_subject") != key:
            summary["subjects_match_keys"] = False
    consumer.close()
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
