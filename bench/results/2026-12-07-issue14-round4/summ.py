import json,sys,glob,os,re
d=sys.argv[1]
pg={}
for l in open(d+'/pg.txt'):
    m=re.match(r'(\w+) (\w+) (\d+) pgticks=(\d+)',l)
    if m: pg[(m[1],m[2],m[3])]=int(m[4])
print(f"{'build':5} {'sc':6} rep | {'fwd r/s':>8} {'relay r/s':>9} {'pg r/s':>8} pg/sq | cpu relay/pg µs | pgsrv µs/ev | ack p99 relay/pg | lost dup")
for (b,sc,r),t in sorted(pg.items(), key=lambda x:(x[0][1],x[0][2],x[0][0])):
    j=json.load(open(f"{d}/{b}-{sc}-{r}.json"))
    rows={x['target']:x for x in j['rows']}
    f=rows.get('forward',{}); s=rows.get('relay',{}); p=rows.get('relay-pg',{})
    ev=p.get('delivered') or p.get('ok') or 1
    g=lambda x,k: x.get(k)
    print(f"{b:5} {sc:6} {r}   | {str(g(f,'ingest_req_s')):>8} {g(s,'ingest_req_s'):>9} {g(p,'ingest_req_s'):>8} {p['ingest_req_s']/s['ingest_req_s']:.2f} | {g(s,'cpu_us_per_delivered_event')}/{g(p,'cpu_us_per_delivered_event')} | {t*10000/ev:.0f} | {s['ack_ms']['p99']}/{p['ack_ms']['p99']} | {p.get('lost')} {p.get('duplicates')} {s.get('lost')} {s.get('duplicates')}")
