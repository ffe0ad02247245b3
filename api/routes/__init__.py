"""Route modules of the API: uploads, jobs, health."""
