"""``e5v serve``: the HTTP front door onto the shared scheduler (needs the serve extra)."""
