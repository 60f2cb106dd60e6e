#!/bin/bash
# Total CPU (clock ticks) used by the PostgreSQL server: live processes plus reaped children of the postmaster.
pm=$(pgrep -o -x postgres)
live=0
for p in $(pgrep -x postgres); do
  set -- $(sed 's/^.*) //' /proc/$p/stat 2>/dev/null)
  # after ") ": field 3=state ... utime is field 14 overall -> index 12 here, stime 13
  [ -n "${12}" ] && live=$((live + ${12} + ${13}))
done
set -- $(sed 's/^.*) //' /proc/$pm/stat)
echo $((live + ${14} + ${15}))
