"""Chemical element -> symbol, all 118 elements; a fixed shuffle (random.Random(0)) into 48 test and 70 train."""
import json, random
from pathlib import Path

ELEMENTS = """Hydrogen H;Helium He;Lithium Li;Beryllium Be;Boron B;Carbon C;Nitrogen N;Oxygen O;Fluorine F;Neon Ne;
Sodium Na;Magnesium Mg;Aluminium Al;Silicon Si;Phosphorus P;Sulfur S;Chlorine Cl;Argon Ar;Potassium K;Calcium Ca;
Scandium Sc;Titanium Ti;Vanadium V;Chromium Cr;Manganese Mn;Iron Fe;Cobalt Co;Nickel Ni;Copper Cu;Zinc Zn;
Gallium Ga;Germanium Ge;Arsenic As;Selenium Se;Bromine Br;Krypton Kr;Rubidium Rb;Strontium Sr;Yttrium Y;Zirconium Zr;
Niobium Nb;Molybdenum Mo;Technetium Tc;Ruthenium Ru;Rhodium Rh;Palladium Pd;Silver Ag;Cadmium Cd;Indium In;Tin Sn;
Antimony Sb;Tellurium Te;Iodine I;Xenon Xe;Caesium Cs;Barium Ba;Lanthanum La;Cerium Ce;Praseodymium Pr;Neodymium Nd;
Promethium Pm;Samarium Sm;Europium Eu;Gadolinium Gd;Terbium Tb;Dysprosium Dy;Holmium Ho;Erbium Er;Thulium Tm;Ytterbium Yb;
Lutetium Lu;Hafnium Hf;Tantalum Ta;Tungsten W;Rhenium Re;Osmium Os;Iridium Ir;Platinum Pt;Gold Au;Mercury Hg;
Thallium Tl;Lead Pb;Bismuth Bi;Polonium Po;Astatine At;Radon Rn;Francium Fr;Radium Ra;Actinium Ac;Thorium Th;
Protactinium Pa;Uranium U;Neptunium Np;Plutonium Pu;Americium Am;Curium Cm;Berkelium Bk;Californium Cf;Einsteinium Es;Fermium Fm;
Mendelevium Md;Nobelium No;Lawrencium Lr;Rutherfordium Rf;Dubnium Db;Seaborgium Sg;Bohrium Bh;Hassium Hs;Meitnerium Mt;Darmstadtium Ds;
Roentgenium Rg;Copernicium Cn;Nihonium Nh;Flerovium Fl;Moscovium Mc;Livermorium Lv;Tennessine Ts;Oganesson Og"""
pairs = [tuple(item.split()) for item in ELEMENTS.replace("\n", "").split(";")]
assert len(pairs) == 118 and len({s for _, s in pairs}) == 118
lines = [{"id": f"z{z:03d}", "question": name, "answer": symbol} for z, (name, symbol) in enumerate(pairs, 1)]
random.Random(0).shuffle(lines)
here = Path(__file__).parent
for split, rows in (("test", lines[:48]), ("train", lines[48:])):
    (here / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
