"""Quality of compressed caches: tasks, a sweep runner over policies x budgets x
lengths, and reports (JSONL rows, a markdown summary, PNG plots)."""
