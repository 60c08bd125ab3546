"""Model families as rows of data over one canonical description (ModelSpec)."""
