#!/usr/bin/env python3
"""Bytes per training step of the memory-bound families (BN forward, BN backward,
ReLU/add) before and after the fused ops of ops::fused, by the
formulas of src/ops/profile/ (Cost), for ResNet50 dense and filters 0.5.

It reproduces exactly what `prunekit bench --device emu --mode filters --sparsity 0,0.5
--steps 1 --warmup 0 --profile` counted before and after (2 x 32x32, f32), and evaluates
the same formulas at the GPU job's size (256 x 224x224, bf16), which would take hours on
the emulation. The conv-plan row tiles (BM) follow ops::conv::plan approximately; they
only size the per-tile statistics pairs, a small term.

"input" is a projection of the BN applied while the next conv loads its input
(ops::fused::conv2d_fprop_bn_input / conv2d_wgrad_bn_input, Cost::conv_bn_input), NOT
yet wired into the training step: bn1 + ReLU and bn2 + ReLU of every bottleneck go into
the loads of conv2 and conv3 (fprop and wgrad), so their apply pass (read y, write the
activation) is gone and each of the two passes reads the 4 per-channel vectors (16 C
bytes); the convs read y instead of the activation (same bytes). Their backward must then
take the ReLU mask from y and the BN's parameters instead of reading the activation (one
read of m*c less; beta read as well: 4 bytes per channel). The stem's BN + ReLU feeds
the max-pool, and bn3 (+ residual) and the downsample BN feed the residual stream,
so they stay as they are.
"""
import math
def out(h,r,s,p): return (h+2*p-r)//s+1
def arch(frac):
    blocks=[]; cin=64
    for stage,(n,w,cout,st) in enumerate([(3,64,256,1),(4,128,512,2),(6,256,1024,2),(3,512,2048,2)]):
        wp=w if frac==0 else min(w, math.ceil((1-frac)*w/8)*8) if False else w
        if frac: wp=math.ceil((1-frac)*w); wp=min(w, math.ceil(wp/8)*8)
        for i in range(n):
            blocks.append(dict(cin=cin,w1=wp,w2=wp,cout=cout,stride=st if i==0 else 1,down=(i==0)))
            cin=cout
    return blocks
def tiles(m,k,c,tc):
    if tc:
        if c%8: bm=64
        elif k>64 and math.ceil(m/128)*math.ceil(k/128)>=132: bm=128
        elif math.ceil(m/128)*math.ceil(k/64)>=132: bm=128
        else: bm=64
    else:
        bm=128 if math.ceil(m/128)*math.ceil(k/128)>=132 else 64
    return math.ceil(m/bm)
def count(N,H,e,frac):
    tc = e==2
    B=dict(before=dict(fwd=0,bwd=0,ra=0,conv_extra=0),after=dict(fwd=0,bwd=0,ra=0,conv_extra=0),
           input=dict(fwd=0,bwd=0,ra=0,conv_extra=0))
    def bn(m,c,relu_fwd,relu_bwd,res, cin, into_conv=False):
        b=B['before']; a=B['after']; i=B['input']
        b['fwd']+=3*m*c*e+32*c
        b['bwd']+=(2*(2+relu_bwd)+1)*m*c*e+20*c
        t=tiles(m,c,cin,tc)
        a['conv_extra']+=8*t*c
        a['fwd']+=8*t*c+24*c + (2+res)*m*c*e+16*c
        i['conv_extra']+=8*t*c
        i['fwd']+=8*t*c+24*c
        if into_conv:
            i['conv_extra']+=2*16*c     # the next conv's fprop and wgrad read gamma, beta, mean, invstd
            i['bwd']+=-m*c*e+4*c        # the mask from y: no read of the activation, beta read
        else:
            i['fwd']+=(2+res)*m*c*e+16*c
    h=out(H,7,2,3); m0=N*h*h
    def bwd(x):
        B['after']['bwd']+=x; B['input']['bwd']+=x
    bn(m0,64,1,1,0,3); bwd(7*m0*64*e+20*64)
    h=out(h,3,2,1)
    for b in arch(frac):
        m1=N*h*h; h2=out(h,3,b['stride'],1); m2=N*h2*h2
        lin=N*h*h*b['cin']; lout=m2*b['cout']
        bn(m1,b['w1'],1,1,0,b['cin'],True); bwd(7*m1*b['w1']*e+20*b['w1'])
        bn(m2,b['w2'],1,1,0,b['w1'],True); bwd(7*m2*b['w2']*e+20*b['w2'])
        bn(m2,b['cout'],0,0,1,b['w2']); bwd(7*m2*b['cout']*e+20*b['cout'])
        if b['down']:
            bn(m2,b['cout'],0,0,0,b['cin']); bwd(5*m2*b['cout']*e+20*b['cout'])
        B['before']['ra']+=3*lout*e*2 + 3*lin*e
        B['after']['ra']+=3*lin*e
        B['input']['ra']+=3*lin*e
        h=h2
    return B
for (N,H,e,name) in [(2,32,4,'emu 2x32x32 f32'),(256,224,2,'cuda 256x224x224 bf16')]:
    for frac in [0,0.5]:
        B=count(N,H,e,frac)
        b=B['before']; a=B['after']
        tb=b['fwd']+b['bwd']+b['ra']; ta=a['fwd']+a['bwd']+a['ra']+a['conv_extra']
        print(f"{name} sparsity {frac}: before fwd {b['fwd']} bwd {b['bwd']} relu_add {b['ra']} | after fwd {a['fwd']} bwd {a['bwd']} relu_add {a['ra']} conv+ {a['conv_extra']} | BN+ReLU/add bytes {tb/1e9:.3f} GB -> {ta/1e9:.3f} GB ({100*(ta-tb)/tb:+.1f}%)")
        i=B['input']; ti=i['fwd']+i['bwd']+i['ra']+i['conv_extra']
        print(f"  input (projection): fwd {i['fwd']} bwd {i['bwd']} relu_add {i['ra']} conv+ {i['conv_extra']} | {ti/1e9:.3f} GB ({100*(ti-ta)/ta:+.1f}% vs after, {100*(ti-tb)/tb:+.1f}% vs before)")
