"""Downloads from the Hugging Face Hub through the real `huggingface_hub` client.

- `plan`: resolve a revision to its commit and list the files a source selects;
- `fetch`: download them (resumable), check them against the Hub's checksums, and
  put them in place atomically with a manifest of sizes and sha256;
- `errors`: every client failure as a LexAlignError that says what to do, never
  with the access token in it;
- `manifest`: the `.lexalign-download.json` that lets a complete download be
  recognised (and checked) without fetching it again.
"""
