"""A task whose data is a Hub dataset, loaded with `datasets` through the Hub-protocol test server."""

from __future__ import annotations

import json

from hfmerge.evaluation.tasks import load_task_data, parse_tasks


def test_hub_dataset_task_loads_through_the_hub(hub, tmp_path):
    rows = [{"text": f"w{i}", "label": i % 2} for i in range(10)]
    repo = hub.unique_repo_id("tiny-ds")
    hub.create_repo_direct(repo, {"validation.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()}, repo_type="dataset")
    spec = parse_tasks([{"task": "t", "dataset_path": repo, "validation_split": "validation",
                         "doc_to_text": "{{text}} ?", "doc_to_choice": ["no", "yes"], "doc_to_target": "label"}], source="r.yaml", base_dir=tmp_path)[0]
    data = load_task_data(spec, ["validation"])
    assert [(e.prompt, e.options, e.label) for e in data.validation] == [(f"w{i} ?", ("no", "yes"), i % 2) for i in range(10)]
    assert hub.requests_matching(None, f"/datasets/{repo}/resolve")  # the rows came from the Hub
