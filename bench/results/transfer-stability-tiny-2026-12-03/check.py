import json,sys,math
for name in sys.argv[1:]:
    v=json.load(open(name))
    print(f"== {name}")
    rows=v['rows']; runs=v['runs']
    div=[r for r in runs if r.get('diverged')]
    print(f"runs {len(runs)}, diverged {len(div)} (final {sum(1 for r in div if r['kind']=='final')}, search {sum(1 for r in div if r['kind']=='search')})")
    for r in div[:5]: print("   ", r['kind'], r['model'], r['budget_gflops'], r['seed'], r['lr'], r['diverged'])
    models=[]
    for r in rows:
        if r['model'] not in models: models.append(r['model'])
    bad=0
    for m in models:
        rs=sorted([r for r in rows if r['model']==m], key=lambda r:r['budget_gflops'])
        line=[]
        for a,b in zip(rs,rs[1:]):
            sea=(a['val_error_std'] or 0)/math.sqrt(a['seeds']-a['diverged']) if a['seeds']-a['diverged']>0 else float('nan')
            seb=(b['val_error_std'] or 0)/math.sqrt(b['seeds']-b['diverged']) if b['seeds']-b['diverged']>0 else float('nan')
            se=math.sqrt(sea**2+seb**2)
            ok = b['val_error'] <= a['val_error'] + 2*se
            if not ok: bad+=1
            line.append(f"{a['budget_gflops']}->{b['budget_gflops']}: {a['val_error']:.3f}->{b['val_error']:.3f} (2se {2*se:.3f}){'' if ok else ' FAIL'}")
        print(m, "; ".join(line))
        print("   means:", " ".join(f"{r['budget_gflops']}:{r['val_error']:.3f}±{r['val_error_std']:.3f}@lr{r['lr']}" for r in rs))
    print("criterion violations:", bad)
