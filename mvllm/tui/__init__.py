"""The full-screen dashboard (Textual): reads one router over HTTP only, in its process or remote."""
