#!/usr/bin/env python3
"""Import cycles between the library's modules (Python 3 standard library only).

  scripts/import_cycles.py      prints the modules, the imports between them and any cycle;
                                exits 1 when there is one

A module is a file under src/ (a folder's mod.rs is the folder); an import is a `crate::` or
`super::` path in its code outside comments and `#[cfg(test)]`, counted to the longest module it
names. A parent declaring its own child, or a child naming its parent, is containment, not an
import. The rule (STYLE.md): no module imports another that imports it back, directly or through
others; a function that needs both lives with the one it belongs to. tests/walk.rs runs this.
"""
import re,glob,sys
def modname(path):
    parts=path[len('src/'):-3].split('/')
    if parts[-1]=='mod': parts=parts[:-1]
    return 'crate' if parts==['lib'] else 'crate::'+'::'.join(parts)
mods={modname(p):p for p in glob.glob('src/**/*.rs', recursive=True) if not p.startswith('src/bin/')}
graph={m:set() for m in mods}
for m,path in mods.items():
    text=open(path).read()
    i=text.find('#[cfg(test)]')
    if i>=0: text=text[:i]
    code='\n'.join(l for l in text.split('\n') if not l.strip().startswith('//'))
    for u in re.findall(r'\b((?:crate|super)(?:::\w+)+)', code):
        parts=u.split('::')
        full=(m.split('::')[:-1]+parts[1:]) if parts[0]=='super' else parts
        for k in range(len(full),0,-1):
            cand='::'.join(full[:k])
            if cand in mods and cand!=m:
                if not (cand.startswith(m+'::') or m.startswith(cand+'::')): graph[m].add(cand)
                break
color={};cycles=[]
def dfs(u,stack):
    color[u]=1; stack.append(u)
    for v in graph[u]:
        if color.get(v)==1: cycles.append(stack[stack.index(v):]+[v])
        elif v not in color: dfs(v,stack)
    stack.pop(); color[u]=2
for m in graph:
    if m not in color: dfs(m,[])
print(len(mods),"modules,",sum(len(v) for v in graph.values()),"imports between them;", "cycles:" if cycles else "no import cycles")
for c in cycles: print("  "+" -> ".join(c))
sys.exit(1 if cycles else 0)
