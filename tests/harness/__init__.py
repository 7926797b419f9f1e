"""Test harness: a real control plane (kine + kube-apiserver), a real Redis, helpers to run the
built kubectl and helm, and process bookkeeping so everything started is stopped by PID."""
