#!/bin/bash
# usage: ab.sh OUTDIR REPS ; alternates relay-base and relay-new over scenarios, PostgreSQL server CPU measured around each run
out=$1; reps=${2:-1}
mkdir -p $out
for r in $(seq 1 $reps); do
 for sc in "c64" "c256" "r100" "r1000"; do
  for b in base new; do
   case $sc in
     c64) args="--concurrencies 64 --rates '' --closed-count 20000";;
     c256) args="--concurrencies 256 --rates '' --closed-count 20000";;
     r100) args="--concurrencies '' --rates 100 --open-secs 10";;
     r1000) args="--concurrencies '' --rates 1000 --open-secs 10";;
   esac
   before=$(/work/notes/pgcpu.sh)
   eval /work/bin/loadgen --relay-bin /work/bin/relay-$b --skip-baseline --skip-backlog --starts 1 --postgres postgres://postgres@127.0.0.1:5432/test $args --out $out/$b-$sc-$r.json > $out/$b-$sc-$r.txt 2>&1
   after=$(/work/notes/pgcpu.sh)
   echo "$b $sc $r pgticks=$((after-before))" >> $out/pg.txt
  done
 done
done
echo done >> $out/pg.txt
